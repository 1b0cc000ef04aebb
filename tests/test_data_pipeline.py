"""The Grain loaders: eval exactly once over processes, resumable train order, skipped frames."""

import json
import os
import shutil

import grain
import numpy as np
import pytest
from etils import epath

from dd_jax import experiment
from dd_jax.data import egodorsal, pipeline, store, validation
from dd_jax.synthetic import dataset as synthetic

from tiny import pose_data_config

SIZE = 24


def _config(root, **kw):
  return pose_data_config(root, out_img_size=SIZE, train_split="all", **kw)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_yields_every_frame_exactly_once(tiny_dataset, process_count):
  per_process = 5  # does not divide the 24 frames or the shards
  config = _config(tiny_dataset, eval_batch_size=per_process * process_count)
  seen, lengths = [], set()
  for p in range(process_count):
    loader = pipeline.make_eval_loader(config, "pose", "all", process_index=p,
                                       process_count=process_count)
    batches = list(loader)
    lengths.add(len(batches))
    assert len(batches) == len(loader) == loader.steps_per_epoch
    ids = []
    for b in batches:
      assert b["img"].shape == (per_process, SIZE, SIZE, 3) and b["img"].dtype == np.float32
      assert b["valid"].shape == (per_process,) and b["valid"].dtype == bool
      assert b["frame_id"].dtype == np.int64 and b["p_id"].dtype == np.int32
      assert "load_error" not in b
      assert (b["frame_id"][~b["valid"]] == -1).all() and (b["img"][~b["valid"]] == 0).all()
      ids += list(b["frame_id"][b["valid"]])
    assert ids == sorted(ids)  # ordered within a process
    seen += ids
  assert len(lengths) == 1  # every process yields the same number of batches
  assert sorted(seen) == list(range(24))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_resume_gives_the_same_next_batches(tiny_dataset, tmp_path, num_workers):
  config = _config(tiny_dataset, batch_size=4, num_workers=num_workers)
  loader = pipeline.make_train_loader(config, "pose", seed=7)
  assert loader.steps_per_epoch == 6
  it = iter(loader)
  _take(it, 4)
  state = it.get_state()
  # Through grain's Orbax handler, as the trainer saves it.
  grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
  expected = _take(it, 5)  # crosses an epoch boundary
  it.close()
  resumed = iter(pipeline.make_train_loader(config, "pose", seed=7))
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), expected)
  resumed.close()
  restored = grain.checkpoint.CheckpointHandler().restore(
      epath.Path(tmp_path), item=iter(pipeline.make_train_loader(config, "pose", seed=7)))
  _assert_same(_take(restored, 5), expected)
  restored.close()


def test_train_order_epochs_shards_and_augmentation(tiny_dataset):
  config = _config(tiny_dataset, batch_size=4)
  epochs = {}
  for p in range(2):
    loader = pipeline.make_train_loader(config, "pose", seed=3, process_index=p, process_count=2)
    assert loader.batch_size == 2 and loader.steps_per_epoch == 6
    it = iter(loader)
    epochs[p] = [[b for b in _take(it, 6)] for _ in range(3)]
  for e in range(3):
    # Each epoch: every frame once, split between the processes without overlap.
    shard0 = np.concatenate([b["frame_id"] for b in epochs[0][e]])
    shard1 = np.concatenate([b["frame_id"] for b in epochs[1][e]])
    assert not set(shard0) & set(shard1) and len(set(shard0) | set(shard1)) == 24
  ids = [np.concatenate([b["frame_id"] for b in e]) for e in epochs[0]]
  assert any(not np.array_equal(ids[0], i) for i in ids[1:])  # reshuffled per epoch
  # The global batch does not depend on the number of processes: process 0's and 1's halves
  # are the single-process batch, augmentation included.
  single = _take(iter(pipeline.make_train_loader(config, "pose", seed=3)), 6)
  for i, whole in enumerate(single):
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([epochs[0][0][i][key], epochs[1][0][i][key]]), whole[key], err_msg=key)
  # Augmentation: the same frame looks different in two epochs; labels do not change.
  first = {int(f): (b["img"][i], b["gt_pose"][i]) for b in epochs[0][0]
           for i, f in enumerate(b["frame_id"])}
  second = {int(f): (b["img"][i], b["gt_pose"][i]) for b in epochs[0][1]
            for i, f in enumerate(b["frame_id"])}
  frame = next(iter(first))
  assert not np.array_equal(first[frame][0], second[frame][0])
  np.testing.assert_array_equal(first[frame][1], second[frame][1])
  # Same seed, same stream; another seed, another order.
  again = _take(iter(pipeline.make_train_loader(config, "pose", seed=3, process_index=0,
                                                 process_count=2)), 6)
  _assert_same(again, epochs[0][0])
  other = _take(iter(pipeline.make_train_loader(config, "pose", seed=4, process_index=0,
                                                 process_count=2)), 6)
  assert not all(np.array_equal(a["frame_id"], b["frame_id"]) for a, b in zip(other, again))


def test_no_augmentation_when_disabled(tiny_dataset):
  config = _config(tiny_dataset, batch_size=4, augment=False)
  train = _take(iter(pipeline.make_train_loader(config, "pose", seed=0)), 6)
  evaluation = {int(f): img for b in pipeline.make_eval_loader(config, "pose", "all")
                for f, img in zip(b["frame_id"], b["img"]) if f >= 0}
  for b in train:
    for f, img in zip(b["frame_id"], b["img"]):
      # Train resizes the float image, eval the uint8 one: equal up to one grey level.
      assert np.abs(img - evaluation[int(f)]).max() < 0.02


def test_batch_size_must_divide(tiny_dataset):
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.make_train_loader(_config(tiny_dataset, batch_size=4), "pose", seed=0, process_index=0,
                               process_count=3)
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.make_train_loader(_config(tiny_dataset, batch_size=48), "pose", seed=0)


def _break_two_frames(tiny_dataset, tmp_path):
  root = str(tmp_path / "bad")
  shutil.copytree(tiny_dataset, root)
  with open(os.path.join(root, "frames.json")) as f:
    frames = json.load(f)["frames"]
  bad_image = os.path.join(root, "trials", frames[9]["cropped_img_path"])
  with open(bad_image, "wb") as f:
    f.write(b"\xff\xd8garbage")
  missing = os.path.join(root, "trials", frames[17]["hamer_path"])
  os.remove(missing)
  return root, bad_image, missing


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_frames_raise_or_are_skipped_and_reported(tiny_dataset, tmp_path, num_workers):
  root, bad_image, missing = _break_two_frames(tiny_dataset, tmp_path)
  with pytest.raises(store.FrameLoadError) as e:
    list(pipeline.make_eval_loader(_config(root, num_workers=num_workers), "pose", "all"))
  assert f"frame 9: {bad_image}" in str(e.value)
  config = _config(root, num_workers=num_workers, skip_bad_frames=True)
  it = iter(pipeline.make_eval_loader(config, "pose", "all"))
  batches = list(it)
  valid = {int(f): bool(v) for b in batches for f, v in zip(b["frame_id"], b["valid"])}
  assert valid[9] is False and valid[17] is False and sum(valid.values()) == 22
  assert it.skipped_total == 2
  report = dict(it.last_report)
  assert f"{bad_image}: " in report[9] and f"{missing}: file not found" in report[17]
  # Train: skipped frames are masked (valid=False) and reported once the epoch is over.
  train = iter(pipeline.make_train_loader(_config(root, num_workers=num_workers, batch_size=4,
                                                  skip_bad_frames=True), "pose", seed=0))
  epoch = _take(train, 6)
  assert sum(int((~b["valid"]).sum()) for b in epoch) == 2
  assert sorted(dict(train.last_report)) == [9, 17]
  train.close()


def test_missing_files_are_skipped_and_reported_once(tiny_dataset, tmp_path, caplog):
  root, _, missing = _break_two_frames(tiny_dataset, tmp_path)
  with pytest.raises(egodorsal.DatasetFormatError, match="frame_00017.npy not found|not found"):
    validation.validate_dataset(_config(root), splits=["all"])
  config = _config(root, skip_bad_frames=True)
  summary = validation.validate_dataset(config, splits=["all"])  # listed, not refused
  assert "1 missing file(s) to skip" in summary and missing in caplog.text
  caplog.clear()
  it = iter(pipeline.make_eval_loader(config, "pose", "all"))
  list(it)
  assert dict(it.last_report)[17] == f"{missing}: file not found"
  assert f"  frame 17: {missing}: file not found" in caplog.text  # the frame named once
  assert "frame 17: frame 17" not in caplog.text


def test_prepare_generates_once_and_validates(tmp_path):
  config = _config(str(tmp_path / "synthetic"))
  config.synthetic.update(enabled=True, participants=2, trials=1, frames=2, image_size=128)
  experiment.prepare_data(config, "pose")
  with open(tmp_path / "synthetic" / synthetic.MARKER) as f:
    made = json.load(f)
  assert made["num_frames"] == 4
  experiment.prepare_data(config, "force")  # already there: not generated again
  with open(tmp_path / "synthetic" / synthetic.MARKER) as f:
    assert json.load(f)["seconds"] == made["seconds"]
  config.synthetic.frames = 3
  with pytest.raises(FileExistsError, match="other settings"):
    experiment.prepare_data(config, "pose")
  assert 3.0 < synthetic.prior_mpjpe_mm(str(tmp_path / "synthetic"), "all") < 40.0
