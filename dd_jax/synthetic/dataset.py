"""A synthetic EgoDorsal dataset: the full SPEC.md §4 layout, rendered from the synthetic hand.

P participants x T trials x F frames of a right hand seen from an egocentric camera (realistic
K, lens distortion, world2cam), with per-participant skin, lighting and hand shape; neutral-pose
base images; HaMeR-style prior files (ground truth + controlled pose noise); annotation files;
precropped frames and bases computed by the same alignment code as the online mode; force
trials of the six motion types with FSR readings and visible press cues; participant splits.

  python tools/make_synthetic_data.py --out /tmp/egodorsal_synth --participants 8 --trials 6

The HaMeR files use HaMeR's camera convention (focal K[0,0]/256*max(w,h), centred principal
point); with the default 256-px frames that is exactly the rendering camera, so the online
alignment is exact. Deterministic from the seed.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import cv2
import jax
import numpy as np

from dd_jax.data import align, egodorsal, samples, store
from dd_jax.data.egodorsal import MOTION_FINGERS, MOTION_LABELS
from dd_jax.mano.model import mano_forward
from dd_jax.synthetic import render
from dd_jax.synthetic import rig as hand_rig
from dd_jax.synthetic.hand import synthetic_mano_model

MOTION_TYPES = tuple(MOTION_LABELS)  # the six force motion types, label order
MARKER = "synthetic.json"  # parameters of a generated set
JPEG_QUALITY = 92
# HaMeR-like prior: shrink towards a half-curled hand, plus per-finger curl noise and a little
# per-joint noise (radians). Like HaMeR's, its errors are mostly whole-finger flexion errors,
# which the image shows: default set's prior MPJPE 15.4 / 16.8 / 16.6 mm (train / val / test).
PRIOR_SHRINK = 0.25
PRIOR_CURL_NOISE = 0.35
PRIOR_JOINT_NOISE = 0.02
# Fingers (thumb..pinky) whose skin shows a press where it differs from the SPEC's FSR vector.
PRESS_SHOWN_ON = {"surface_tap_all_force": (0.0, 1.0, 1.0, 1.0, 1.0)}


def _mano_batch(model, betas, pose, orient, transl):
  return mano_forward(model, betas, pose, global_orient=orient, transl=transl)


_mano_jit = jax.jit(_mano_batch)


def mano_numpy(model, betas, pose, orient=None, transl=None, chunk: int = 64):
  """Batched MANO in fixed-size chunks (one compilation): (vertices, keypoints) float64."""
  n = len(pose)
  orient = np.broadcast_to(np.eye(3), (n, 3, 3)) if orient is None else orient
  transl = np.zeros((n, 3)) if transl is None else transl
  outs_v, outs_k = [], []
  for s in range(0, n, chunk):
    sl = slice(s, min(s + chunk, n))
    pad = chunk - (sl.stop - sl.start)
    arrs = [np.pad(np.asarray(a[sl], np.float32), [(0, pad)] + [(0, 0)] * (np.ndim(a) - 1))
            for a in (betas, pose, orient, transl)]
    arrs[2][len(arrs[2]) - pad:] = np.eye(3)
    out = _mano_jit(model, *arrs)
    outs_v.append(np.asarray(out.vertices, np.float64)[:chunk - pad])
    outs_k.append(np.asarray(out.keypoints, np.float64)[:chunk - pad])
  return np.concatenate(outs_v), np.concatenate(outs_k)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  return cv2.Rodrigues(np.asarray(axis, np.float64).reshape(3) * angle)[0]


def _placement(rig, rng, jitter: float, posture: tuple[float, np.ndarray, float]) -> np.ndarray:
  """Global orientation (3, 3): back of the hand to the camera, fingers towards image right.

  posture = (in-plane angle, tilt axis, tilt angle) of the participant (degrees); each shot
  adds a small jitter, so a base and a frame differ by a near-planar motion of the hand's
  back, which the keypoint homography can undo.
  """
  spin0, axis, tilt0 = posture
  ref = rig.rest_orientation()  # rows forward, lateral, dorsal (rest frame)
  cam = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # the same axes in the camera
  R = cam.T @ ref  # rest -> camera: forward -> +x, lateral -> -y, dorsal -> -z
  spin = _rotation([0, 0, 1], np.deg2rad(spin0 + rng.uniform(-6, 6) * jitter))
  tilt = _rotation(axis, np.deg2rad(tilt0))
  wobble = _rotation(rng.normal(0, 1, 3) * [1, 1, 0], np.deg2rad(rng.uniform(0, 3) * jitter))
  return wobble @ tilt @ spin @ R


def _posture(rng) -> tuple[float, np.ndarray, float]:
  axis = np.array([*rng.normal(0, 1, 2), 0.0])
  return float(rng.uniform(-12, -4)), axis / np.linalg.norm(axis), float(rng.uniform(6, 12))


def _hamer_cam_t(keypoints: np.ndarray, pixels: np.ndarray, K: np.ndarray, width: int,
                 height: int) -> np.ndarray:
  """HaMeR-style translation: least squares so HaMeR's camera projects `keypoints` onto `pixels`."""
  f = align.hamer_focal(K, width, height)
  c = np.array([width / 2.0, height / 2.0])
  rows, rhs = [], []
  for axis in range(2):
    du = pixels[:, axis] - c[axis]
    a = np.zeros((len(pixels), 3))
    a[:, axis] = f
    a[:, 2] = -du
    rows.append(a)
    rhs.append(du * keypoints[:, 2] - f * keypoints[:, axis])
  return np.linalg.lstsq(np.concatenate(rows), np.concatenate(rhs), rcond=None)[0]


def _distortion_maps(K, d, width, height, margin):
  """Maps from raw (distorted) pixels into a pinhole canvas with `margin` pixels on each side."""
  grid = np.stack(np.meshgrid(np.arange(width), np.arange(height)), -1).reshape(-1, 1, 2)
  ideal = cv2.undistortPoints(grid.astype(np.float64), K, d, P=K).reshape(height, width, 2)
  ideal += margin
  return ideal[..., 0].astype(np.float32), ideal[..., 1].astype(np.float32)


class _Scene:
  """Renders raw frames of one participant's camera."""

  def __init__(self, rig, look, K, d, width, height):
    self.rig, self.look, self.K, self.d = rig, look, K, d
    self.width, self.height = width, height
    self.margin = int(np.ceil(0.12 * width))
    self.K_canvas = K.copy()
    self.K_canvas[:2, 2] += self.margin
    self.maps = _distortion_maps(K, d, width, height, self.margin)
    self.forearm_rest, self.forearm_faces = hand_rig.forearm_mesh(rig)

  def render(self, vertices, orient, wrist, curls, press, backdrop, rng) -> np.ndarray:
    rig = self.rig
    arm = (self.forearm_rest - rig.joints[0]) @ orient.T + wrist
    all_v = np.concatenate([vertices, arm])
    all_f = np.concatenate([rig.faces, self.forearm_faces + len(vertices)])
    size = (self.width + 2 * self.margin, self.height + 2 * self.margin)
    raster = render.rasterize(all_v, all_f, self.K_canvas, size)
    image = backdrop.copy()
    arm_mask = raster.face >= len(rig.faces)
    if arm_mask.any():
      normals = render.interpolate(render.Raster(np.where(arm_mask, raster.face, -1), raster.bary,
                                                 raster.depth), all_f,
                                   render.vertex_normals(all_v, all_f))[arm_mask]
      normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)
      diffuse = np.clip(np.abs(normals @ self.look.light_dir), 0, 1)
      shade = self.look.ambient + (1 - self.look.ambient) * diffuse
      image[arm_mask] = np.clip(self.look.skin * 0.97 * shade[:, None] * self.look.light_color, 0, 1)
    hand = render.Raster(np.where(arm_mask, -1, raster.face), raster.bary, raster.depth)
    hand_rig.shade_hand(rig, self.look, hand, vertices, curls, press, image)
    raw = cv2.remap(image, *self.maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    raw += rng.normal(0, 1.5 / 255, raw.shape).astype(np.float32)
    return cv2.cvtColor(np.clip(np.rint(raw * 255), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)

  def backdrop(self, rng):
    return hand_rig.background(rng, self.width + 2 * self.margin,
                                     self.height + 2 * self.margin)


def _frame_curls(rng, motion: str, fsr: float) -> tuple[np.ndarray, np.ndarray]:
  """Finger curls (5,) thumb..pinky and press (5,) for a frame of a force trial."""
  curls = -0.05 + 1.1 * rng.beta(0.5, 0.5, 5)  # mostly open or closed: clearly visible
  curls[0] = rng.uniform(0.0, 0.8)
  active = np.asarray(MOTION_FINGERS[motion], np.float64)  # index, middle, ring, pinky, thumb
  active = np.concatenate([active[4:], active[:4]])  # -> thumb..pinky
  gesture = {"force_pinch_index": [0.55, 0.55, 0, 0, 0], "force_pinch_middle": [0.6, 0, 0.6, 0, 0],
             "force_pinch_ring": [0.65, 0, 0, 0.65, 0], "force_fist_clench": [0.7, 0.9, 0.9, 0.9, 0.9],
             "surface_tap_all_force": [0.2, 0.3, 0.3, 0.3, 0.3],
             "surface_tap_index_force": [0.1, 0.35, 0, 0, 0]}[motion]
  pressing = fsr >= 0.2
  amount = rng.uniform(0.6, 1.0) if pressing else rng.uniform(0.0, 0.7)
  target = np.asarray(gesture) + 0.1 * fsr
  mix = active * amount * (np.asarray(gesture) > 0)
  curls = (1 - mix) * curls + mix * target
  # The press shows on the fingers that push (a surface tap with all fingers uses all four,
  # though its FSR vector is the index's), saturating above the label threshold of 0.2.
  shows = np.asarray(PRESS_SHOWN_ON.get(motion, active))
  press = shows * np.clip((fsr - 0.1) / 0.3, 0.0, 1.0)
  return np.clip(curls, -0.1, 1.0), press


def _save_npy(path: str, value: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, value, allow_pickle=True)


def _save_jpeg(path: str, bgr: np.ndarray) -> bytes:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  assert ok, path
  data = buf.tobytes()
  with open(path, "wb") as f:
    f.write(data)
  return data


def _hamer_dict(pose_aa, orient, betas, keypoints, cam_t, K, width, height):
  f = align.hamer_focal(K, width, height)
  kp2d = align.project_hamer(keypoints, cam_t, f, width, height)
  mats = np.stack([cv2.Rodrigues(a)[0] for a in pose_aa.reshape(15, 3)])
  return {"betas": betas.reshape(1, 10).astype(np.float32),
          "global_orient": orient.reshape(1, 1, 3, 3).astype(np.float32),
          "hand_pose": mats.reshape(1, 15, 3, 3).astype(np.float32),
          "cam_t": cam_t.reshape(1, 3).astype(np.float32),
          "keypoints_3d": keypoints.reshape(1, 21, 3).astype(np.float32),
          "keypoints_2d": kp2d.reshape(1, 21, 2).astype(np.float32)}


def _world2cam(rng) -> np.ndarray:
  q = rng.normal(size=4)
  q /= np.linalg.norm(q)
  w, x, y, z = q
  R = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])
  T = np.eye(4)
  T[:3, :3], T[:3, 3] = R, rng.uniform(-0.5, 0.5, 3)
  return T


def _translation(keypoints, K, width, height, rng, depth, jitter) -> np.ndarray:
  """Translation putting the palm centre at a (jittered) pixel and depth."""
  centre = 0.5 * (keypoints[0] + keypoints[9])
  px = np.array([0.34 * width, 0.5 * height]) + rng.uniform(-1, 1, 2) * jitter * 0.04 * width
  z = depth * (1 + rng.uniform(-0.05, 0.05) * jitter)
  target = np.array([(px[0] - K[0, 2]) / K[0, 0] * z, (px[1] - K[1, 2]) / K[1, 1] * z, z])
  return target - centre


def make_synthetic_dataset(out_dir: str, *, participants: int = 8, trials: int = 6,
                           frames: int = 10, image_size: int = 256, seed: int = 0,
                           bases: int = 2, model=None) -> dict:
  """Writes a synthetic EgoDorsal set into `out_dir` (created; must not exist or be empty).

  Frames are image_size x 3/4 image_size pixels. Returns a summary (counts, seconds).
  Held-out participants differ in skin, light, shape and posture: a model needs several
  training participants to generalise (8 x 6 x 10 trains on 6; 4 x 6 x 20 on only 2). Motion
  types cycle over all trials in order, so with 6 trials every participant performs all six
  and the motion type is not confounded with who performs it (a force model would learn
  participants instead).
  Splits by participant: test = the last, val = the one before, train = the rest (with fewer
  than 3 participants val and test share the last one).
  """
  start = time.perf_counter()
  if model is None:
    model = synthetic_mano_model()
  rig = hand_rig.HandRig(model)
  width, height = int(image_size), int(round(image_size * 0.375)) * 2
  hand_length = float(np.linalg.norm(rig.tips[2] - rig.joints[0]))
  os.makedirs(out_dir, exist_ok=True)
  if os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} is not empty")
  bases_json = {"bases_dir": "bases", "participants": []}
  trials_json = {"trials": []}
  frames_list, owners = [], []  # frames.json entries and their participants
  frame_id, trial_id = 0, 0
  for p in range(1, participants + 1):
    rng = np.random.default_rng([seed, p])
    look = hand_rig.make_appearance(rng, rig, p)
    fx = width * rng.uniform(0.82, 0.88)
    K = np.array([[fx, 0, width / 2.0], [0, fx, height / 2.0], [0, 0, 1]])
    d = np.array([[rng.uniform(-0.12, -0.04), rng.uniform(0.0, 0.04), rng.normal(0, 5e-4),
                   rng.normal(0, 5e-4), 0.0]])
    scene = _Scene(rig, look, K, d, width, height)
    depth = fx * hand_length / (0.7 * width)
    posture = _posture(rng)
    pdir = f"PARTICIPANT_{p:03d}"
    entries = []
    for b in range(bases):
      curls = rng.uniform(0.02, 0.12, 5)
      shot = _shoot(model, rig, scene, rng, curls[None], np.zeros((1, 5)), np.zeros((1, 4)),
                    depth, posture, jitter=0.3)[0]
      img_rel, hamer_rel = f"{pdir}/imgs/base_{b:03d}.jpg", f"{pdir}/hamer/base_{b:03d}.npy"
      _save_jpeg(os.path.join(out_dir, "bases", img_rel), shot["image"])
      _save_npy(os.path.join(out_dir, "bases", hamer_rel), shot["hamer"])
      entries.append({"base_id": b, "img_path": img_rel, "hamer_path": hamer_rel})
    bases_json["participants"].append({"p_id": p, "bases": entries})
    for t in range(trials):
      trial_id += 1
      trng = np.random.default_rng([seed, p, t, 1])
      motion = MOTION_TYPES[((p - 1) * trials + t) % len(MOTION_TYPES)]
      trials_json["trials"].append({
          "trial_id": trial_id, "p_id": p, "motion_type": motion, "hand_position": "table",
          "K": K.tolist(), "d": d.tolist(), "world2cam": _world2cam(trng).tolist()})
      fsr = np.where(trng.random(frames) < 0.45, trng.uniform(0.25, 1.0, frames),
                     trng.uniform(0.0, 0.15, frames))
      state = [_frame_curls(trng, motion, float(v)) for v in fsr]
      curls = np.stack([s[0] for s in state])
      press = np.stack([s[1] for s in state])
      spread = trng.normal(0, 0.08, (frames, 4))
      shots = _shoot(model, rig, scene, trng, curls, press, spread, depth, posture, jitter=1.0,
                     world2cam=np.asarray(trials_json["trials"][-1]["world2cam"]))
      tdir = f"{pdir}/TRIAL_{trial_id:03d}"
      for k, shot in enumerate(shots):
        name = f"frame_{k:05d}"
        rel = {"img_path": f"{tdir}/imgs/{name}.jpg", "ann_path": f"{tdir}/anns/{name}.npy",
               "hamer_path": f"{tdir}/hamer/{name}.npy",
               "cropped_img_path": f"{tdir}/cropped_images/{name}.jpg",
               "cropped_base_path": f"{tdir}/cropped_bases/{name}.jpg"}
        _save_jpeg(os.path.join(out_dir, "trials", rel["img_path"]), shot["image"])
        _save_npy(os.path.join(out_dir, "trials", rel["ann_path"]), shot["ann"])
        _save_npy(os.path.join(out_dir, "trials", rel["hamer_path"]), shot["hamer"])
        reading = round(float(fsr[k]), 4)
        frames_list.append({
            "trial_id": trial_id, "timestamp": round(k / 30.0, 4), "frame_no": 3 * k, **rel,
            "cropped_base_idx": int(trng.integers(bases)), "fsr_reading": reading,
            "tap_label": float(MOTION_LABELS[motion] if reading >= 0.2 else 0),
            "frame_id": frame_id})
        owners.append(p)
        frame_id += 1
  _write_json(out_dir, "bases.json", bases_json)
  _write_json(out_dir, "trials.json", trials_json)
  _precrop(out_dir, frames_list)
  _write_splits(out_dir, frames_list, owners, participants)
  summary = dict(participants=participants, trials=trials, frames=frames, image_size=image_size,
                 seed=seed, bases=bases, num_frames=len(frames_list),
                 seconds=round(time.perf_counter() - start, 2))
  _write_json(out_dir, MARKER, summary)
  return summary


def _shoot(model, rig, scene, rng, curls, press, spread, depth, posture, jitter, world2cam=None):
  """Renders a batch of poses: raw image (BGR), HaMeR dict, annotation dict per pose."""
  n = len(curls)
  betas = np.broadcast_to(scene.look.betas, (n, 10))
  pose = rig.pose(curls, spread)
  orient = np.stack([_placement(rig, rng, jitter, posture) for _ in range(n)])
  shrink = curls + PRIOR_SHRINK * (0.45 - curls) + rng.normal(0, PRIOR_CURL_NOISE, curls.shape)
  prior_pose = rig.pose(shrink, 0.5 * spread) + rng.normal(0, PRIOR_JOINT_NOISE, (n, 45))
  both_v, both_k = mano_numpy(model, np.concatenate([betas, betas]),
                              np.concatenate([pose, prior_pose]), np.concatenate([orient, orient]))
  vertices, keypoints, prior_kp = both_v[:n], both_k[:n], both_k[n:]
  K, width, height = scene.K, scene.width, scene.height
  backdrop = scene.backdrop(rng)  # one surface per trial (and per base)
  shots = []
  for i in range(n):
    transl = _translation(keypoints[i], K, width, height, rng, depth, jitter)
    v, kp = vertices[i] + transl, keypoints[i] + transl
    image = scene.render(v, orient[i], kp[0], curls[i], press[i], backdrop, rng)
    pixels, _ = render.project(kp, K)
    stable = [0, 1, 5, 9, 13, 17]  # pose-independent keypoints: HaMeR's camera fit is exact
    cam_t = _hamer_cam_t(prior_kp[i][stable], pixels[stable], K, width, height)
    hamer = _hamer_dict(prior_pose[i], orient[i], scene.look.betas, prior_kp[i], cam_t, K,
                        width, height)
    raw_px = cv2.projectPoints(kp, np.zeros(3), np.zeros(3), K, scene.d)[0].reshape(21, 2)
    w2c = np.eye(4) if world2cam is None else world2cam
    R_wc, t_wc = w2c[:3, :3], w2c[:3, 3]
    aa = pose[i].reshape(1, 15, 3).astype(np.float32)
    ann = {"betas": scene.look.betas.reshape(1, 10).astype(np.float32),
           "global_orient": cv2.Rodrigues(R_wc.T @ orient[i])[0].reshape(1, 3).astype(np.float32),
           "hand_pose": aa, "pose": aa.copy(),
           "cam_t": transl.reshape(1, 3).astype(np.float32),
           "keypoints_3d": ((kp - t_wc) @ R_wc).astype(np.float32),
           "keypoints_2d": raw_px.astype(np.float32)}
    shots.append({"image": image, "hamer": hamer, "ann": ann})
  return shots


def _write_json(out_dir: str, name: str, value) -> None:
  with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)


def _precrop(out_dir: str, frames_list: list[dict]) -> None:
  """Cropped frames and aligned bases, computed by the online mode's own code."""
  index = egodorsal.load_index(out_dir)
  options = samples.SampleOptions("pose", precropped=False, random_base=False, fsr_thresh=0.2,
                                   out_img_size=0, skip_bad_frames=False)
  folder = store.FolderStore(index)
  reader = samples.SampleReader(index, [], folder, options)
  frames_dir = os.path.join(out_dir, "trials")
  for item in frames_list:
    frame = egodorsal.Frame(
        frame_id=item["frame_id"], trial_id=item["trial_id"],
        p_id=index.trials[item["trial_id"]].p_id,
        img_path=os.path.join(frames_dir, item["img_path"]), cropped_img_path=None,
        cropped_base_path=None, cropped_base_idx=item["cropped_base_idx"], ann_path=None,
        hamer_path=os.path.join(frames_dir, item["hamer_path"]), fsr_reading=None, tap_label=None)
    trial = index.trials[frame.trial_id]
    prior = folder.frame_prior(frame)
    base_prior = folder.base_prior(trial.p_id, frame.cropped_base_idx, frame.frame_id)
    img, base, _ = reader._align_online(  # pylint: disable=protected-access
        frame, trial, frame.cropped_base_idx, prior, base_prior)
    _save_jpeg(os.path.join(frames_dir, item["cropped_img_path"]), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    _save_jpeg(os.path.join(frames_dir, item["cropped_base_path"]),
               cv2.cvtColor(base, cv2.COLOR_RGB2BGR))


def participant_splits(participants: int) -> dict[str, list[int]]:
  ids = list(range(1, participants + 1))
  if participants >= 3:
    return {"train": ids[:-2], "val": [ids[-2]], "test": [ids[-1]]}
  return {"train": ids[:1], "val": [ids[-1]], "test": [ids[-1]]}


def _write_splits(out_dir, frames_list, owners, participants) -> None:
  _write_json(out_dir, "frames.json", {"frames_dir": "trials", "split": "full", "frames": frames_list})
  for split, ids in participant_splits(participants).items():
    keep = [f for f, p in zip(frames_list, owners) if p in ids]
    _write_json(out_dir, f"{split}.json", {"frames_dir": "trials", "split": split, "frames": keep})


def ensure_synthetic_dataset(out_dir: str, **params) -> bool:
  """Generates the set into `out_dir` unless a set with these parameters is there; True if made.

  Safe when several processes call it at once: each generates into a private folder and the
  first to rename it into place wins. A folder without the synthetic marker is never touched.
  """
  params = {"participants": 8, "trials": 6, "frames": 10, "image_size": 256, "seed": 0,
            "bases": 2, **params}
  marker = os.path.join(out_dir, MARKER)
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      existing = json.load(f)
    if all(existing.get(k) == v for k, v in params.items()):
      return False
    raise FileExistsError(f"{out_dir} holds a synthetic set made with other settings "
                          f"({ {k: existing.get(k) for k in params} }); delete it or change data_dir")
  if os.path.exists(out_dir) and os.listdir(out_dir):
    return False  # a real (or foreign) dataset: validation will judge it
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = f"{os.path.abspath(out_dir)}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  make_synthetic_dataset(tmp, **params)
  try:
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)
    os.rename(tmp, out_dir)
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return False
  return True


def prior_mpjpe_mm(data_dir: str, split: str = "test", model=None) -> float:
  """MPJPE (mm) of the HaMeR prior against the ground truth over a split (SPEC.md §5).

  MANO with zero global orientation, the base's HaMeR betas (cropped_base_idx), 21 keypoints.
  """
  if model is None:
    model = synthetic_mano_model()
  index = egodorsal.load_index(data_dir)
  frames = egodorsal.select_frames(index, split)
  folder = store.FolderStore(index)
  gt, prior, betas = [], [], []
  for f in frames:
    gt.append(folder.frame_ground_truth(f))
    prior.append(folder.frame_prior(f).hand_pose)
    betas.append(folder.base_prior(f.p_id, f.cropped_base_idx or 0, f.frame_id).betas)
  betas = np.stack(betas)
  _, kp_gt = mano_numpy(model, betas, np.stack(gt))
  _, kp_prior = mano_numpy(model, betas, np.stack(prior))
  return float(np.mean(np.linalg.norm(kp_gt - kp_prior, axis=-1)) * 1000.0)
