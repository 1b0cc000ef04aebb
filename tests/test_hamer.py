"""HaMeR in JAX against HaMeR's network in PyTorch (tests/reference/hamer.py): a checkpoint
saved as Lightning saves it, converted by tools/convert_hamer.py, gives the same rotations,
betas, camera and 3D keypoints; the converter names every key that does not fit and runs
nothing from the file."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dd_jax import geometry, parallel
from dd_jax.convert import hamer as convert_hamer
from dd_jax.mano import io as mano_io
from dd_jax.models import hamer
from dd_jax.priors import predictor as predictor_lib

from reference import hamer as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("omegaconf")


class Exploit:
  """Unpickling this runs a shell command, unless the reader refuses to execute globals."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch model, converted folder, checkpoint, MANO folder) of a tiny random HaMeR, saved with
  omegaconf hyper-parameters and converted by the command-line tool."""
  folder = tmp_path_factory.mktemp("hamer")
  model = ref.tiny_model(str(folder / "mano"), seed=0)
  ckpt = folder / "hamer.ckpt"
  ref.save_checkpoint(str(ckpt), model, ref.omegaconf_hyper_parameters())
  out = folder / "converted"
  args = [sys.executable, os.path.join(ROOT, "tools", "convert_hamer.py"), str(ckpt), str(out),
          "--variant", "custom", "--custom", __import__("json").dumps(ref.TINY_CUSTOM)]
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
  result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  for expected in ("skipped 46 key(s): the adversarial discriminator",
                   "skipped 13 key(s): smplx MANO buffers", "omegaconf.dictconfig.DictConfig",
                   "hyper_parameters"):
    assert expected in result.stdout, result.stdout
  return model, out, ckpt, folder / "mano"


def _one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), (parallel.DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


@pytest.fixture(scope="module")
def mano(converted):
  return mano_io.load_mano(os.path.join(converted[3], "MANO_RIGHT.pkl"))


@pytest.fixture(scope="module")
def predictor(converted, mano):
  return predictor_lib.HamerPredictor.from_weights(str(converted[1]), mano, _one_device_mesh())[0]


def test_converted_network_matches_hamer(converted, predictor):
  model = converted[0]
  crops = torch.randn(3, 3, 256, 256, generator=torch.Generator().manual_seed(0))
  want = model(crops)
  got = predictor.predict(crops.numpy().transpose(0, 2, 3, 1))
  params = want["pred_mano_params"]
  for key in ("global_orient", "hand_pose", "betas"):
    err = np.abs(got[key] - params[key].numpy()).max()
    print(f"{key} max abs err {err:.2e}")
    assert err <= 1e-4, key
  cam = want["pred_cam"].numpy()
  rel = np.abs(got["pred_cam"] - cam).max() / np.abs(cam).max()
  kp_err = np.abs(got["keypoints_3d"] - want["pred_keypoints_3d"].numpy()).max()
  kp2_err = np.abs(got["keypoints_2d_crop"] - want["pred_keypoints_2d"].numpy()).max()
  print(f"pred_cam rel err {rel:.2e}, keypoints_3d {kp_err:.2e} m, keypoints_2d {kp2_err:.2e}")
  assert rel <= 1e-3 and kp_err <= 1e-5 and kp2_err <= 1e-4
  # The weights reach every output (random weights move them well away from the means).
  assert np.abs(params["hand_pose"].numpy() - np.eye(3)).max() > 0.3


def test_bfloat16_compute_stays_close(converted, mano, predictor):
  crops = np.random.default_rng(1).standard_normal((3, 256, 256, 3)).astype(np.float32)
  bf16, _ = predictor_lib.HamerPredictor.from_weights(str(converted[1]), mano, _one_device_mesh(),
                                                      dtype="bfloat16")
  a, b = predictor.predict(crops), bf16.predict(crops)
  assert b["hand_pose"].dtype == np.float32
  assert np.abs(a["hand_pose"] - b["hand_pose"]).max() < 0.1


def test_rotation_6d_is_hamers_layout():
  x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
  want = ref.rot6d_to_rotmat(x).numpy()
  got = np.asarray(geometry.rotation_6d_to_matrix(jnp.asarray(x.numpy())))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(np.einsum("bij,bik->bjk", got, got), np.broadcast_to(np.eye(3), got.shape),
                             atol=1e-5)
  # SPIN's interleaved layout is a different map (what a wrong port would compute).
  interleaved = np.asarray(geometry.rotation_6d_to_matrix(
      jnp.asarray(x.numpy().reshape(64, 3, 2).transpose(0, 2, 1).reshape(64, 6))))
  assert np.abs(interleaved - want).max() > 0.5


def test_released_sizes_have_hamers_parameter_counts():
  config = hamer.get_config()
  shapes = convert_hamer.expected_shapes(config)  # cached: the error test below reuses it
  count = lambda part: sum(int(np.prod(s)) for path, s in shapes.items()
                           if path[0] == part and not path[-1].startswith("init_"))
  assert count("backbone") == 630_912_000
  assert count("mano_head") == 39_497_837
  assert config.backbone.grid == (16, 12)


def test_crafted_checkpoint_runs_nothing(tmp_path, converted):
  model, _, _, _ = converted
  marker = tmp_path / "executed"
  ckpt = tmp_path / "crafted.ckpt"
  ref.save_checkpoint(str(ckpt), model, {"cfg": Exploit(str(marker))}, extra=Exploit(str(marker)))
  config, params, notes = convert_hamer.convert(ckpt, hamer.get_config("custom", **ref.TINY_CUSTOM))
  assert not marker.exists(), "unpickling ran code from the checkpoint"
  assert any("system" in note for note in notes), notes
  assert params["mano_head"]["init_cam"].shape == (1, 3) and config.backbone.dim == 64
  # An object where a tensor belongs is named, not run.
  state = model.state_dict()
  state["mano_head.decpose.weight"] = Exploit(str(marker))
  torch.save({"state_dict": state}, tmp_path / "crafted2.ckpt")
  with pytest.raises(convert_hamer.ConversionError, match="mano_head.decpose.weight: a Stub"):
    convert_hamer.convert(tmp_path / "crafted2.ckpt", hamer.get_config("custom", **ref.TINY_CUSTOM))
  assert not marker.exists()


def test_every_problem_is_listed_at_once(tmp_path, converted):
  model, _, _, _ = converted
  state = model.state_dict()
  del state["backbone.blocks.1.mlp.fc2.bias"]
  del state["mano_head.init_cam"]
  state["mano_head.deccam.weight"] = torch.zeros(4, 64)
  state["backbone.extra.weight"] = torch.zeros(2)
  torch.save({"state_dict": state}, tmp_path / "broken.ckpt")
  with pytest.raises(convert_hamer.ConversionError) as info:
    convert_hamer.convert(tmp_path / "broken.ckpt", hamer.get_config("custom", **ref.TINY_CUSTOM))
  text = str(info.value)
  for expected in ("missing keys (2)", "backbone.blocks.1.mlp.fc2.bias", "mano_head.init_cam",
                   "mano_head.deccam.weight: (4, 64)", "unexpected keys (1): backbone.extra.weight"):
    assert expected in text, text
  # The released sizes against a tiny file: the sizes that differ are named.
  with pytest.raises(convert_hamer.ConversionError, match="backbone.dim: file 64, config 1280"):
    convert_hamer.convert(tmp_path / "broken.ckpt")


def test_mean_parameter_file_fills_missing_buffers(tmp_path, converted):
  model, _, _, _ = converted
  state = model.state_dict()
  for name in ("init_hand_pose", "init_betas", "init_cam"):
    del state[f"mano_head.{name}"]
  torch.save({"state_dict": state}, tmp_path / "no_means.ckpt")
  means = ref.mean_params(seed=5)
  np.savez(tmp_path / "mano_mean_params.npz", **means)
  _, params, notes = convert_hamer.convert(tmp_path / "no_means.ckpt",
                                           hamer.get_config("custom", **ref.TINY_CUSTOM),
                                           mean_params_path=tmp_path / "mano_mean_params.npz")
  np.testing.assert_allclose(params["mano_head"]["init_cam"], means["cam"][None], atol=1e-7)
  assert any("taken from the mean-parameter file" in n for n in notes)
