"""Tests for the synthetic MANO-format hand: topology, conventions, rig quality, the CLI tool."""

import collections
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dd_jax.mano import io as mano_io
from dd_jax.mano import model as mano_model
from dd_jax.synthetic import hand as synthetic

FINGERTIPS = dict(zip(("thumb", "index", "middle", "ring", "pinky"), mano_model.DELTADORSAL_TIP_IDS))
DISTAL_JOINT = {"thumb": 15, "index": 3, "middle": 6, "ring": 12, "pinky": 9}


@pytest.fixture(scope="module")
def hand():
  return synthetic.make_synthetic_mano()


def _boundary_edges(faces):
  directed = collections.Counter((int(f[i]), int(f[(i + 1) % 3])) for f in faces for i in range(3))
  return directed, [(a, b) for (a, b) in directed if (b, a) not in directed]


def test_counts_and_manifold_disk_open_only_at_the_wrist(hand):
  faces = hand["f"].astype(np.int64)
  assert hand["v_template"].shape == (778, 3) and faces.shape == (1538, 3)
  assert len(np.unique(faces)) == 778  # every vertex used
  assert np.all(faces[:, 0] != faces[:, 1]) and np.all(faces[:, 1] != faces[:, 2])
  directed, boundary = _boundary_edges(faces)
  assert max(directed.values()) == 1  # consistent orientation: no directed edge twice
  undirected = collections.Counter(tuple(sorted(e)) for e in directed.elements())
  assert set(undirected.values()) <= {1, 2}
  # One boundary loop of 16 edges (as MANO's wrist hole), so V - E + F = 1 (a disk).
  following = dict(boundary)
  loop, v = [boundary[0][0]], following[boundary[0][0]]
  while v != loop[0]:
    loop.append(v)
    v = following[v]
  assert len(loop) == len(boundary) == 16
  assert 778 - len(undirected) + 1538 == 1
  # Every vertex's faces form a single fan (no pinched vertices).
  for vertex in range(778):
    incident = faces[np.any(faces == vertex, axis=1)]
    links = {}
    for f in incident:
      i = int(np.nonzero(f == vertex)[0][0])
      links[int(f[(i + 1) % 3])] = int(f[(i + 2) % 3])
    start = next(iter(set(links) - set(links.values())), next(iter(links)))  # path end, if any
    steps, v = 0, start
    while v in links and steps <= len(links):
      v, steps = links[v], steps + 1
      if v == start:
        break
    assert steps == len(links), f"vertex {vertex} has more than one fan"
  wrist = hand["v_template"][loop]
  assert np.all(wrist[:, 0] > hand["J"][0, 0])  # the hole is at the wrist end


def test_surface_faces_outward_and_dorsum_faces_plus_y(hand):
  v, faces = hand["v_template"], hand["f"].astype(np.int64)
  _, boundary = _boundary_edges(faces)
  center = v[[a for a, _ in boundary]].mean(0)
  tri = v[faces]
  volume = np.sum(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2]))) / 6
  volume += sum(np.dot(v[b], np.cross(v[a], center)) for a, b in boundary) / 6  # cap the hole
  assert 200e-6 < volume < 600e-6  # positive (outward normals), hand-sized in m^3
  face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
  normals = np.zeros_like(v)
  for k in range(3):
    np.add.at(normals, faces[:, k], face_normals)
  palm = (v[:, 0] > 0.02) & (v[:, 0] < 0.08) & (np.abs(v[:, 2]) < 0.02)
  middle = np.median(v[palm, 1])
  assert np.all(normals[palm & (v[:, 1] > middle), 1] > 0)  # back of the hand: +y
  assert np.all(normals[palm & (v[:, 1] < middle), 1] < 0)  # palm: -y


def test_conventions_and_size(hand):
  v, joints = hand["v_template"], hand["J"]
  np.testing.assert_allclose(joints, hand["J_regressor"] @ v)
  tips = {name: v[i] for name, i in FINGERTIPS.items()}
  assert all(tip[0] < joints[0, 0] - 0.09 for tip in tips.values())  # fingers along -x
  assert tips["thumb"][2] > tips["index"][2] > tips["middle"][2] > tips["ring"][2] > \
      tips["pinky"][2]  # thumb on +z, pinky on -z
  length = joints[0, 0] - tips["middle"][0]
  assert 0.18 <= length <= 0.19  # wrist to middle fingertip
  assert 0.07 < v[:, 2].max() - v[:, 2].min() < 0.20  # thumb to pinky span
  for name, (j1, j2, j3) in synthetic._JOINT_IDS.items():  # chains run distally
    assert joints[j1, 0] > joints[j2, 0] > joints[j3, 0] > tips[name][0], name


def test_fingertip_vertices_are_the_tips(hand):
  v, joints, weights = hand["v_template"], hand["J"], hand["weights"]
  dominant = weights.argmax(1)
  for name, tip in FINGERTIPS.items():
    distal = DISTAL_JOINT[name]
    assert dominant[tip] == distal
    direction = v[tip] - joints[distal]
    assert 0.015 < np.linalg.norm(direction) < 0.04
    direction /= np.linalg.norm(direction)
    same_bone = dominant == distal
    assert np.all((v[same_bone] - joints[distal]) @ direction <= (v[tip] - joints[distal]) @
                  direction + 1e-12), f"{name}: tip vertex {tip} is not the most distal"
  for other, ours in ((744, 743), (320, 333)):  # smplx / HaMeR ids are near the same tips
    assert np.linalg.norm(v[other] - v[ours]) < 0.01


def test_rig_weights_regressor_and_blend_shapes(hand):
  weights, regressor, faces = hand["weights"], hand["J_regressor"], hand["f"].astype(np.int64)
  assert np.all(weights >= 0) and np.allclose(weights.sum(1), 1)
  edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
  assert np.abs(weights[edges[:, 0]] - weights[edges[:, 1]]).max() < 0.5  # smooth, no jumps
  assert np.all(regressor >= 0) and np.allclose(regressor.sum(1), 1)
  for joint in range(16):
    support = np.nonzero(regressor[joint])[0]
    assert 3 <= len(support) <= 30
    assert np.linalg.norm(hand["v_template"][support] - hand["J"][joint], axis=1).max() < 0.04
  components = hand["hands_components"]
  np.testing.assert_allclose(components @ components.T, np.eye(45), atol=1e-12)
  mean = hand["hands_mean"].reshape(15, 3)
  assert np.all(mean[:12, 2] > 0) and np.abs(mean).max() < 0.5  # a slight curl about +z
  assert hand["hands_coeffs"].shape == (1554, 45)
  assert 0 < np.abs(hand["posedirs"]).max() < 0.002  # small correctives (m per unit)


def test_shape_directions_change_lengths_and_width():
  model = synthetic.synthetic_mano_model()
  betas = np.zeros((4, 10))
  betas[1, 2] = 2.0  # finger length
  betas[2, 1] = 2.0  # palm width
  betas[3, 0] = 2.0  # overall size
  kp = np.asarray(mano_model.mano_forward(model, betas, np.zeros((4, 45))).keypoints)
  finger = lambda k: np.linalg.norm(k[12] - k[9])  # middle knuckle to tip
  width = lambda k: np.linalg.norm(k[5] - k[17])  # index to pinky knuckle
  assert finger(kp[1]) > 1.08 * finger(kp[0])
  assert width(kp[2]) > 1.08 * width(kp[0])
  assert abs(finger(kp[2]) - finger(kp[0])) < 1e-3
  size = lambda k: np.linalg.norm(k[12] - k[0])
  assert size(kp[3]) > 1.08 * size(kp[0])


def test_bent_fingers_stay_attached():
  model = synthetic.synthetic_mano_model()
  pose = np.zeros((2, 15, 3))
  pose[1, :12, 2] = 0.6  # curl the four fingers
  out = mano_model.mano_forward(model, np.zeros((2, 10)), pose.reshape(2, 45))
  rest, bent = np.asarray(out.vertices)
  faces = model.faces
  rest_edges = np.linalg.norm(rest[faces[:, 0]] - rest[faces[:, 1]], axis=1)
  bent_edges = np.linalg.norm(bent[faces[:, 0]] - bent[faces[:, 1]], axis=1)
  assert np.all(bent_edges < 2.5 * rest_edges + 1e-3)  # no torn or exploded triangles
  tips = np.asarray(out.keypoints)[:, [8, 12, 16, 20]]
  assert np.all(tips[1, :, 1] < tips[0, :, 1] - 0.03)  # curled fingertips move to the palm side


def test_generation_is_fast_and_deterministic(hand):
  start = time.perf_counter()
  fresh = synthetic._synthetic_arrays.__wrapped__(0)
  assert time.perf_counter() - start < 4.0  # ~0.15 s when the machine is idle
  for key, value in fresh.items():
    if isinstance(value, np.ndarray):
      np.testing.assert_array_equal(value, hand[key])
  other = synthetic.make_synthetic_mano(seed=1)
  np.testing.assert_array_equal(other["v_template"], hand["v_template"])
  assert not np.array_equal(other["hands_coeffs"], hand["hands_coeffs"])


def test_cached_model_and_copies():
  assert synthetic.synthetic_mano_model() is synthetic.synthetic_mano_model()
  smplx_tips = synthetic.synthetic_mano_model(tip_ids=mano_model.SMPLX_TIP_IDS)
  assert smplx_tips.tip_ids == mano_model.SMPLX_TIP_IDS
  arrays = synthetic.make_synthetic_mano()
  arrays["v_template"][0] = 1.0  # callers get copies; the cache is untouched
  assert synthetic.make_synthetic_mano()["v_template"][0, 0] != 1.0
  with jax.enable_x64(True):
    assert synthetic.synthetic_mano_model(dtype="float64").v_template.dtype == np.float64
  assert synthetic.synthetic_mano_model().v_template.dtype == np.float32


def test_load_mano_or_synthetic(tmp_path):
  assert mano_io.load_mano_or_synthetic("") is synthetic.synthetic_mano_model()
  path = synthetic.write_synthetic_mano(str(tmp_path), layout="npz")
  loaded = mano_io.load_mano_or_synthetic(path, tip_ids=mano_model.SMPLX_TIP_IDS)
  assert loaded.tip_ids == mano_model.SMPLX_TIP_IDS
  np.testing.assert_array_equal(np.asarray(loaded.weights),
                                np.asarray(synthetic.synthetic_mano_model().weights))


def test_cli_writes_loadable_files(tmp_path):
  tool = os.path.join(os.path.dirname(__file__), "..", "tools", "make_synthetic_mano.py")
  result = subprocess.run([sys.executable, tool, "--out_dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr
  names = sorted(os.listdir(tmp_path))
  assert names == sorted(synthetic.SYNTHETIC_FILENAMES.values())
  assert all("SYNTHETIC" in name for name in names)
  for name in names:
    arrays = mano_io.read_mano_arrays(tmp_path / name)
    assert "synthetic_note" not in arrays or "SYNTHETIC" in arrays["synthetic_note"]
