"""The analysis: per-frame errors against a NumPy reference written from SPEC.md §5, table means
± SD against a plain recomputation, finger visibility, face labels, per-click voting, statistics."""

import json
import os
import shutil

import cv2
import jax
import numpy as np
import pytest
from scipy import stats as scipy_stats

from dd_jax import experiment, metrics
from dd_jax.analysis import (
  clicks,
  fields,
  force_tables,
  pose_errors,
  report,
  stats,
  tables,
  visibility,
)
from dd_jax.data import egodorsal
from dd_jax.mano.model import mano_forward
from dd_jax.synthetic import rig as synthetic_rig
from dd_jax.synthetic.hand import synthetic_mano_model

_mano = jax.jit(mano_forward)

# ------------------------------------------------------------------ reference (SPEC.md §5)
TRIPLETS = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 5, 6], [5, 6, 7], [6, 7, 8], [0, 9, 10],
            [9, 10, 11], [10, 11, 12], [0, 13, 14], [13, 14, 15], [14, 15, 16], [0, 17, 18],
            [17, 18, 19], [18, 19, 20]]


def ref_angle_errors(pred, gt):
  """The original's MPJAE: arccos of the clipped dot of unit bone vectors, degrees, per joint."""
  def angles(points):
    out = np.zeros(points.shape[:1] + (15,))
    for k, (p, j, c) in enumerate(TRIPLETS):
      a = points[:, p] - points[:, j]
      b = points[:, c] - points[:, j]
      a /= np.linalg.norm(a, axis=-1, keepdims=True)
      b /= np.linalg.norm(b, axis=-1, keepdims=True)
      out[:, k] = np.arccos(np.clip(np.sum(a * b, -1), -1, 1))
    return out
  return np.degrees(np.abs(angles(pred) - angles(gt)))


def ref_pa_mpjpe(pred, gt):
  """PA-MPJPE (mm) with Horn's quaternion solution for the rotation (a proper rotation by
  construction) and the least-squares isotropic scale; not the SVD route dd_jax takes."""
  out = []
  for x, y in zip(pred, gt):
    xc, yc = x - x.mean(0), y - y.mean(0)
    s = xc.T @ yc  # S[i, j] = sum x_i y_j
    n = np.array([
        [s[0, 0] + s[1, 1] + s[2, 2], s[1, 2] - s[2, 1], s[2, 0] - s[0, 2], s[0, 1] - s[1, 0]],
        [s[1, 2] - s[2, 1], s[0, 0] - s[1, 1] - s[2, 2], s[0, 1] + s[1, 0], s[2, 0] + s[0, 2]],
        [s[2, 0] - s[0, 2], s[0, 1] + s[1, 0], -s[0, 0] + s[1, 1] - s[2, 2], s[1, 2] + s[2, 1]],
        [s[0, 1] - s[1, 0], s[2, 0] + s[0, 2], s[1, 2] + s[2, 1], -s[0, 0] - s[1, 1] + s[2, 2]]])
    w, v = np.linalg.eigh(n)
    q0, qx, qy, qz = v[:, np.argmax(w)]
    rot = np.array([
        [q0 ** 2 + qx ** 2 - qy ** 2 - qz ** 2, 2 * (qx * qy - q0 * qz), 2 * (qx * qz + q0 * qy)],
        [2 * (qy * qx + q0 * qz), q0 ** 2 - qx ** 2 + qy ** 2 - qz ** 2, 2 * (qy * qz - q0 * qx)],
        [2 * (qz * qx - q0 * qy), 2 * (qz * qy + q0 * qx), q0 ** 2 - qx ** 2 - qy ** 2 + qz ** 2]])
    rotated = xc @ rot.T
    scale = np.sum(rotated * yc) / np.sum(xc * xc)
    out.append(1000 * np.linalg.norm(scale * rotated + y.mean(0) - y, axis=-1).mean())
  return np.array(out)


def _keypoints(n, seed=0):
  """Plausible hands: synthetic MANO keypoints of random curls, and noisy predictions of them."""
  rng = np.random.default_rng(seed)
  model = synthetic_mano_model()
  rig = synthetic_rig.HandRig(model)
  gt = np.asarray(_mano(model, np.zeros((n, 10), np.float32),
                               rig.pose(rng.uniform(0, 1, (n, 5))).astype(np.float32)).keypoints,
                  np.float64)
  pred = gt + rng.normal(0, 0.006, gt.shape)
  prior = gt + rng.normal(0, 0.01, gt.shape)
  return pred, gt, prior


def test_per_frame_errors_match_the_spec_reference():
  pred, gt, _ = _keypoints(48)
  errors = pose_errors.frame_errors(pred, gt)
  reference = ref_angle_errors(pred, gt)
  np.testing.assert_allclose(errors["angle_error"], reference, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(errors["mpjae"], reference.mean(1), rtol=1e-5)
  np.testing.assert_allclose(errors["pa_mpjpe"], ref_pa_mpjpe(pred, gt), rtol=1e-5)
  np.testing.assert_allclose(errors["mpjpe"], 1000 * np.linalg.norm(pred - gt, axis=-1).mean(1),
                             rtol=1e-12)
  # The split sums of metrics.py give the same means over the split.
  sums = jax.jit(metrics.pose_metric_sums)(pred.astype(np.float32), gt.astype(np.float32),
                                           gt.astype(np.float32))
  sums = metrics.finalize_pose({k: np.asarray(v, np.float64) for k, v in sums.items()})
  assert abs(sums["mpjae"] - errors["mpjae"].mean()) < 2e-3 * errors["mpjae"].mean()
  assert abs(sums["auc"] - pose_errors.auc(pose_errors.pck_curve(errors["joint_error"]))) < 1e-3


def _pose_record(n=60, seed=1):
  pred, gt, prior = _keypoints(n, seed)
  rng = np.random.default_rng(seed)
  motions = np.array(["force_pinch_index", "surface_tap_index_force", "force_fist_clench"])
  return {"frame_id": np.arange(n), "pred_kp_3d": pred, "gt_kp_3d": gt, "hamer_kp_3d": prior,
          "p_id": np.repeat([1, 2, 3], n // 3), "motion_type": motions[np.arange(n) % 3],
          "hand_position": np.array(["table", "air"])[rng.integers(0, 2, n)],
          "finger_visibility": rng.uniform(0, 1, (n, 5))}


def _mean_sd(per_participant):
  values = np.array(per_participant)
  return values.mean(), values.std(ddof=1)


def test_table_means_and_sds_match_a_plain_recomputation():
  record = _pose_record()
  frames = tables.PoseFrames.from_record(record)
  p = record["p_id"]
  model_angles = ref_angle_errors(record["pred_kp_3d"], record["gt_kp_3d"])
  prior_angles = ref_angle_errors(record["hamer_kp_3d"], record["gt_kp_3d"])

  per_joint = tables.per_joint_table(frames)
  for j in range(15):
    cell_model, cell_prior, change = per_joint.rows[j][2:]
    mean, sd = _mean_sd([model_angles[p == q, j].mean() for q in (1, 2, 3)])
    np.testing.assert_allclose([cell_model.mean, cell_model.sd], [mean, sd], rtol=1e-5)
    prior_mean, _ = _mean_sd([prior_angles[p == q, j].mean() for q in (1, 2, 3)])
    np.testing.assert_allclose(change, 100 * (1 - mean / prior_mean), rtol=1e-4)
  pa = ref_pa_mpjpe(record["pred_kp_3d"], record["gt_kp_3d"])
  pa_row = next(r for r in per_joint.rows if r[1].startswith("PA-MPJPE"))
  np.testing.assert_allclose([pa_row[2].mean, pa_row[2].sd],
                             _mean_sd([pa[p == q].mean() for q in (1, 2, 3)]), rtol=1e-5)

  by_motion = tables.per_group_table(frames, "motion_type", "motion type")
  for row in by_motion.rows:
    select = record["motion_type"] == row[0]
    assert row[1] == select.sum()
    np.testing.assert_allclose(row[3].mean, np.mean(
        [model_angles[select & (p == q)].mean() for q in (1, 2, 3)]), rtol=1e-5)

  # Finger MPJAE of fingers <= 50% visible, per participant over (frame, finger) pairs.
  finger_error = model_angles.reshape(-1, 5, 3).mean(-1)
  low = record["finger_visibility"] <= 0.5
  occluded = tables.visibility_tables(frames)[1].rows[0]
  np.testing.assert_allclose([occluded[2].mean, occluded[2].sd], _mean_sd(
      [finger_error[(p == q)[:, None] & low].mean() for q in (1, 2, 3)]), rtol=1e-5)

  # Taps: MCP flexion RMSE of the index (the finger surface_tap_index_force names) when < 50%.
  taps = tables.occlusion_tables(frames)[0].rows[0]
  assert taps[0] == "surface_tap_index_force"
  select = (record["motion_type"] == "surface_tap_index_force") & \
      (record["finger_visibility"][:, 1] < 0.5)
  expected = [np.sqrt(np.mean(model_angles[select & (p == q), 3] ** 2)) for q in (1, 2, 3)
              if np.any(select & (p == q))]
  np.testing.assert_allclose(taps[2].values, expected, rtol=1e-5)

  # The MPJAE-vs-visibility line over (frame, finger) pairs, per 10% visible.
  fit = tables.visibility_tables(frames)[2].rows[0]
  ref = scipy_stats.linregress(100 * record["finger_visibility"].reshape(-1),
                               finger_error.reshape(-1))
  np.testing.assert_allclose(fit[1:4], [10 * ref.slope, ref.intercept, ref.rvalue ** 2],
                             rtol=1e-9)
  # PA-MPJPE of frames with any finger <= 50% visible.
  low_frame = low.any(1)
  pa_row = tables.visibility_tables(frames)[1].rows[1]
  assert pa_row[1] == low_frame.sum()
  np.testing.assert_allclose([pa_row[2].mean, pa_row[2].sd],
                             _mean_sd([pa[low_frame & (p == q)].mean() for q in (1, 2, 3)]),
                             rtol=1e-5)

  # Pinches: fingertip-to-thumb distance RMSE (mm) when the pinching finger (index) is < 50%.
  pinch = tables.occlusion_tables(frames)[1].rows[0]
  assert pinch[0] == "force_pinch_index"
  select = (record["motion_type"] == "force_pinch_index") & \
      (record["finger_visibility"][:, 1] < 0.5)
  distance = lambda kp: 1000 * np.linalg.norm(kp[:, 8] - kp[:, 4], axis=-1)
  gap = distance(record["pred_kp_3d"]) - distance(record["gt_kp_3d"])
  expected = [np.sqrt(np.mean(gap[select & (p == q)] ** 2)) for q in (1, 2, 3)
              if np.any(select & (p == q))]
  assert pinch[1] == select.sum()
  np.testing.assert_allclose(pinch[2].values, expected, rtol=1e-9)

  auc = tables.pck_table(frames)[0].rows[0][1]
  errors = 1000 * np.linalg.norm(record["pred_kp_3d"] - record["gt_kp_3d"], axis=-1)
  thresholds = np.linspace(0, 50, 501)
  expected = [np.trapezoid((errors[p == q].reshape(-1)[None] < thresholds[:, None]).mean(1),
                           thresholds) / 50 for q in (1, 2, 3)]
  np.testing.assert_allclose([auc.mean, auc.sd], _mean_sd(expected), rtol=1e-9)


def test_test_outputs_with_string_fields_read_back(tmp_path):
  # As the test phase writes them (np.save of the dict), with motion types and hand positions
  # as unicode arrays: dd_jax's safe reader gives back what numpy's own loader does.
  record = _pose_record(6)
  path = experiment.write_test_outputs(str(tmp_path), 3, record, {})
  read = report.load_record(path)
  expected = np.load(path, allow_pickle=True).item()
  assert sorted(read) == sorted(expected)
  for key, value in expected.items():
    assert read[key].dtype == value.dtype, key
    np.testing.assert_array_equal(read[key], value)
  assert read["motion_type"][0] == "force_pinch_index"


def test_csv_has_mean_sd_and_participants_per_summary_cell():
  frames = tables.PoseFrames.from_record(_pose_record())
  table = tables.per_joint_table(frames)
  lines = table.csv().strip().split("\n")
  assert lines[0].startswith("finger,joint,DeltaDorsal error mean,DeltaDorsal error sd,"
                             "DeltaDorsal error participants,prior error mean")
  assert len(lines) == 1 + len(table.rows)
  first = lines[1].split(",")
  np.testing.assert_allclose(float(first[2]), table.rows[0][2].mean, rtol=1e-12)
  assert first[4] == "3"


def test_participant_metadata_and_its_anova(tmp_path):
  record = _pose_record()
  data = tmp_path / "data"
  data.mkdir()
  # Skin tone from bases.json for two participants, from a participants.json for the third.
  (data / "bases.json").write_text(json.dumps(
      {"participants": [{"p_id": 1, "bases": [], "skin_tone": 2}, {"p_id": 2, "skin_tone": 5}]}))
  (tmp_path / "participants.json").write_text(json.dumps([{"p_id": 3, "skin_tone": 5}]))
  metadata = report.participant_metadata(str(data), str(tmp_path))
  assert metadata == {1: {"skin_tone": 2}, 2: {"skin_tone": 5}, 3: {"skin_tone": 5}}
  per, anova = tables.participant_tables(tables.PoseFrames.from_record(record), metadata)
  assert [row[:3] for row in per.rows] == [[1, 20, 2], [2, 20, 5], [3, 20, 5]]
  mpjae = ref_angle_errors(record["pred_kp_3d"], record["gt_kp_3d"]).mean(1)
  tone = np.array([{1: 2, 2: 5, 3: 5}[q] for q in record["p_id"]])
  row = next(r for r in anova.rows if r[:2] == ["skin_tone", "DeltaDorsal MPJAE"])
  f, p = scipy_stats.f_oneway(mpjae[tone == 2], mpjae[tone == 5])
  assert row[2] == f"F(1, 58) = {f:.2f}" and float(row[3]) == pytest.approx(p, rel=1e-2)
  between = sum((tone == t).sum() * (mpjae[tone == t].mean() - mpjae.mean()) ** 2 for t in (2, 5))
  np.testing.assert_allclose(row[4], between / np.sum((mpjae - mpjae.mean()) ** 2), rtol=1e-5)
  assert {r[0] for r in anova.rows} == {"participant", "skin_tone"}
  # One participant and no metadata: no factor to test, said so (not "F(0, 19) = nan").
  one = {k: v[:20] for k, v in record.items()}
  _, anova = tables.participant_tables(tables.PoseFrames.from_record(one), {})
  assert not anova.rows and "nothing to compare" in anova.note


# ------------------------------------------------------------------ visibility


def _box(lo, hi):
  """A closed box (8 vertices, 12 triangles wound so that normals point outwards)."""
  corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                      for z in (lo[2], hi[2])], np.float64)
  quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  faces = []
  for a, b, c, d in quads:
    for tri in ((a, b, c), (a, c, d)):
      t = corners[list(tri)]
      normal = np.cross(t[1] - t[0], t[2] - t[0])
      faces.append(tri if normal @ (t.mean(0) - corners.mean(0)) > 0 else tri[::-1])
  return corners, np.array(faces)


# Behind the box, the slab's front face (0.03 x 0.06 m at 0.70 m) loses the box's x > 0 half
# (0.01 x 0.02 m at 0.50 m) in projection: 1 - (0.01 * 0.02 / 0.5²) / (0.03 * 0.06 / 0.7²).
_SLAB_BEHIND = 1 - (0.01 * 0.02 / 0.5 ** 2) / (0.03 * 0.06 / 0.7 ** 2)


@pytest.mark.parametrize("occluder_z, finger_share, slab_share",
                         [((0.30, 0.31), 0.5, 1.0), ((0.70, 0.71), 1.0, _SLAB_BEHIND)])
def test_visibility_of_boxes_matches_a_hand_computed_share(occluder_z, finger_share, slab_share):
  # An "index" box straddling the optical axis (only its front face faces the camera) and a
  # "dorsal" slab whose edge lies in the plane x = 0: in front of the box it hides exactly the
  # box's x > 0 half; behind it, the box hides part of the slab. Side faces face away.
  finger, finger_faces = _box((-0.01, -0.01, 0.50), (0.01, 0.01, 0.52))
  slab, slab_faces = _box((0.0, -0.03, occluder_z[0]), (0.03, 0.03, occluder_z[1]))
  vertices = np.concatenate([finger, slab])
  faces = np.concatenate([finger_faces, slab_faces + 8])
  labels = np.array([0] * 12 + [visibility.DORSAL] * 12)
  shares = visibility.label_visibility(vertices, faces, labels)
  np.testing.assert_allclose(shares[[0, visibility.DORSAL]], [finger_share, slab_share], atol=0.03)
  assert np.isnan(shares[1])  # no middle-finger faces
  with pytest.raises(ValueError, match="in front of the camera"):
    visibility.label_visibility(vertices - [0, 0, 0.6], faces, labels)


def _camera_mesh(curls, side="dorsal"):
  """The synthetic hand posed by finger curls (thumb..pinky), seen from 40 cm by a camera
  facing its back (or palm)."""
  model = synthetic_mano_model()
  rig = synthetic_rig.HandRig(model)
  vertices = np.asarray(_mano(model, np.zeros((1, 10), np.float32),
                                     rig.pose(np.asarray(curls, np.float64)[None]).astype(
                                         np.float32)).vertices[0], np.float64)
  z = -rig.dorsal if side == "dorsal" else rig.dorsal
  rotation = np.stack([rig.forward, np.cross(z, rig.forward), z])
  return (vertices - vertices.mean(0)) @ rotation.T + [0, 0, 0.4], model


@pytest.mark.parametrize("side", ["dorsal", "palm"])
def test_open_hand_facing_the_camera_is_visible(side):
  vertices, model = _camera_mesh([0, 0, 0, 0, 0], side)
  labels = visibility.generate_face_labels(model)
  assert np.all(visibility.finger_visibility(vertices, model.faces, labels) >= 0.9)


def test_finger_curled_behind_the_palm_is_mostly_hidden():
  # Seen from the back, the index curls under the palm; the other fingers stay straight.
  vertices, model = _camera_mesh([0, 1, 0, 0, 0])
  labels = visibility.generate_face_labels(model)
  visible = visibility.finger_visibility(vertices, model.faces, labels)
  assert visible[1] < 0.5, visible
  assert np.all(visible[[0, 2, 3, 4]] >= 0.9), visible
  # The palm seen from the back is hidden entirely; the dorsal surface is not.
  by_label = visibility.label_visibility(vertices, model.faces, labels)
  assert by_label[visibility.DORSAL] > 0.95 and by_label[visibility.PALM] < 0.05


def test_face_labels_cover_every_face_once_and_round_trip(tmp_path):
  model = synthetic_mano_model()
  labels = visibility.generate_face_labels(model)
  faces = np.asarray(model.faces)
  assert labels.shape == (len(faces),)
  counts = np.bincount(labels, minlength=8)
  assert counts.sum() == len(faces) and np.all(counts[:7] > 0) and counts[7] == 0
  # Each finger's faces lie on that finger: their vertices are skinned by its joints.
  owner = np.argmax(np.asarray(model.weights), 1)
  for finger, chain in enumerate(visibility.FINGER_JOINTS):
    on_finger = np.isin(owner[faces[labels == visibility.FINGER_LABELS[finger]]], chain)
    assert on_finger.mean() > 0.9
  path = visibility.save_face_labels(labels, str(tmp_path / "mano_face_labels.json"))
  with open(path, encoding="utf-8") as f:
    assert json.load(f) == labels.tolist()  # the original's format: one flat list of ints
  np.testing.assert_array_equal(visibility.load_face_labels(path, len(faces)), labels)
  with pytest.raises(ValueError, match="1537 labels for a mesh of 1538"):
    visibility.save_face_labels(labels[:-1], path)
    visibility.load_face_labels(path, len(faces))
  with open(path, "w", encoding="utf-8") as f:
    json.dump([0, 9, 1], f)
  with pytest.raises(ValueError, match=r"mano_face_labels.json: entry 1 is 9"):
    visibility.load_face_labels(path)


def test_dataset_frames_get_metadata_and_visibility(tiny_dataset, tmp_path):
  data = str(tmp_path / "data")
  shutil.copytree(tiny_dataset, data)
  index = egodorsal.load_index(data)
  frames = egodorsal.select_frames(index, "all")
  ids = [f.frame_id for f in frames[:8]]
  meta = fields.frame_metadata(data, ids)
  assert meta["motion_type"][0] == index.trials[frames[0].trial_id].motion_type
  np.testing.assert_array_equal(meta["p_id"], [f.p_id for f in frames[:8]])

  # The ground-truth mesh in the camera frame lands on the annotated 2D keypoints (fingertips
  # are mesh vertices) through the trial's K and distortion: the camera convention is right.
  model = synthetic_mano_model()
  frame, trial = frames[0], index.trials[frames[0].trial_id]
  hand = fields._read_hand(frame, trial)  # pylint: disable=protected-access
  vertices = fields.hands_in_camera(model, [hand])[0]
  tips = cv2.projectPoints(vertices[list(model.tip_ids)], np.zeros(3), np.zeros(3), trial.K,
                           trial.d)[0].reshape(5, 2)
  annotated = np.load(frame.ann_path, allow_pickle=True).item()["keypoints_2d"][[4, 8, 12, 16, 20]]
  np.testing.assert_allclose(tips, annotated, atol=0.05)

  # A frame whose annotation is gone gets NaN and is listed; the others are computed.
  os.remove(frames[1].ann_path)
  labels = visibility.generate_face_labels(model)
  visible, problems = fields.finger_visibility_field(data, ids, model, labels)
  assert np.all(np.isnan(visible[1])) and np.all((visible[[0] + list(range(2, 8))] >= 0)
                                                 & (visible[[0] + list(range(2, 8))] <= 1))
  assert len(problems) == 1 and frames[1].ann_path in problems[0] and "not found" in problems[0]
  with pytest.raises(KeyError, match="not in"):
    fields.frame_metadata(data, [10 ** 6])


# ------------------------------------------------------------------ force: per-click voting


def test_per_click_voting_on_a_hand_made_trace():
  # Trial 7: max 0.9 -> clicks are runs above 0.18: frames 2-4 and 7-8. Trial 8: one run.
  fsr = [0.0, 0.05, 0.5, 0.9, 0.4, 0.1, 0.0, 0.3, 0.35, 0.05] + [0.0, 0.6, 0.1]
  trial = [7] * 10 + [8] * 3
  pred = [0, 0, 1, 1, 0, 0, 0, 0, 2, 0] + [0, 3, 0]
  gt = [0, 0, 1, 1, 1, 0, 0, 1, 1, 0] + [0, 4, 0]
  order = np.random.default_rng(0).permutation(13)  # any row order; time decides
  time = np.array(list(range(10)) + list(range(3)), np.float64)
  found = clicks.find_clicks(np.array(fsr)[order], np.array(trial)[order], time[order])
  members = sorted((c.trial_id, time[order][c.frames].tolist()) for c in found)
  assert members == [(7, [2.0, 3.0, 4.0]), (7, [7.0, 8.0]), (8, [1.0])]
  predicted, true = clicks.click_labels(np.array(pred)[order], np.array(gt)[order], found)
  by_trial_start = {(c.trial_id, float(time[order][c.frames[0]])): (int(p), int(t))
                    for c, p, t in zip(found, predicted, true)}
  # (1, 1, 0) -> 1; (0, 2) is a tie, broken by the peak frame (0.35 -> 2); (3,) -> 3.
  assert by_trial_start == {(7, 2.0): (1, 1), (7, 7.0): (2, 1), (8, 1.0): (3, 4)}

  record = {"frame_id": np.arange(13), "p_id": np.ones(13, int), "trial_id": np.array(trial),
            "motion_type": np.array(["force_pinch_index"] * 13), "pred_tap_labels": np.array(pred),
            "gt_tap_labels": np.array(gt), "fsr_reading": np.array(fsr), "timestamp": time}
  found_tables, confusions = force_tables.force_tables(force_tables.ForceFrames.from_record(record))
  click_row = found_tables[1].rows[0]
  assert click_row[:2] == ["force_pinch_index", 3]
  assert click_row[2].mean == pytest.approx(1 / 3)
  expected = np.zeros((7, 7), int)
  expected[1, 1] = expected[1, 2] = expected[4, 3] = 1
  np.testing.assert_array_equal(confusions["clicks_in-air"], expected)
  assert found_tables[0].rows[0][2].mean == pytest.approx(np.mean(np.array(pred) == gt))
  assert found_tables[0].rows[0][3].mean == pytest.approx(_weighted_f1(pred, gt))
  assert click_row[3].mean == pytest.approx(_weighted_f1([1, 2, 3], [1, 1, 4]))
  # The baseline: always the most frequent true class of all clicks (1).
  assert click_row[4].mean == pytest.approx(_weighted_f1([1, 1, 1], [1, 1, 4]))


def _weighted_f1(pred, gt):
  """sklearn's f1_score(average="weighted", zero_division=0), written out."""
  pred, gt = np.asarray(pred), np.asarray(gt)
  total = 0.0
  for c in np.unique(gt):
    tp = np.sum((pred == c) & (gt == c))
    precision = tp / max(np.sum(pred == c), 1)
    recall = tp / np.sum(gt == c)
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    total += np.sum(gt == c) / len(gt) * f1
  return total


# ------------------------------------------------------------------ statistics


def test_anova_and_line_match_scipy():
  rng = np.random.default_rng(3)
  groups = np.repeat(["a", "b", "c"], [10, 14, 9])
  values = rng.normal(0, 1, len(groups)) + (groups == "b") * 0.8
  result = stats.one_way_anova(values, groups)
  f, p = scipy_stats.f_oneway(*(values[groups == g] for g in "abc"))
  np.testing.assert_allclose([result.f, result.p], [f, p], rtol=1e-10)
  assert (result.df_between, result.df_within) == (2, 30)
  means = {g: values[groups == g].mean() for g in "abc"}
  between = sum((groups == g).sum() * (means[g] - values.mean()) ** 2 for g in "abc")
  np.testing.assert_allclose(result.eta_squared, between / np.sum((values - values.mean()) ** 2))

  x = rng.uniform(0, 100, 50)
  y = 3 - 0.1 * x + rng.normal(0, 1, 50)
  line, ref = stats.fit_line(x, y), scipy_stats.linregress(x, y)
  np.testing.assert_allclose([line.slope, line.intercept, line.r_squared],
                             [ref.slope, ref.intercept, ref.rvalue ** 2], rtol=1e-10)
