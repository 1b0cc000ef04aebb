"""Which frames a split of a run holds: split files, or participant lists (leave-one-out).

The run's three roles are data.train_split / val_split / test_split (split file names: 'train',
'val', 'test', 'all' = frames.json, ...). With data.leave_one_out the roles select participants
from frames.json instead (SPEC.md §4).
"""

from __future__ import annotations

from dd_jax.data import egodorsal


def run_splits(data_config) -> list[str]:
  """The run's train, val and test split names, each once."""
  names = []
  for name in (data_config.train_split, data_config.val_split, data_config.test_split):
    if name and name not in names:
      names.append(name)
  return names


def resolve_split(data_config, split: str, index: egodorsal.EgoDorsalIndex | None = None
                  ) -> tuple[str, tuple[int, ...]]:
  """Maps a split of the run to (split file name, participants).

  `split` is a split file name ('train', 'val', 'test', 'all', ...); the configured
  data.train_split / val_split / test_split names identify the run's three roles. With
  data.leave_one_out the roles select participants from frames.json instead: val and test are
  their lists, train is every participant (data.all_participant_ids, or everyone in the
  metadata when empty) minus val minus test.
  """
  if not data_config.leave_one_out:
    return split, ()
  val = tuple(int(p) for p in data_config.val_participants)
  test = tuple(int(p) for p in data_config.test_participants)
  roles = {data_config.train_split: "train", data_config.val_split: "val",
           data_config.test_split: "test"}
  role = roles.get(split, split)
  if role == "val":
    return "all", val
  if role == "test":
    return "all", test
  if role == "train":
    everyone = tuple(int(p) for p in data_config.all_participant_ids)
    if not everyone:
      if index is None:
        index = egodorsal.load_index(data_config.data_dir)
      everyone = tuple(index.participants)
    return "all", tuple(p for p in everyone if p not in set(val) | set(test))
  return split, ()


def leave_one_out_problems(data_config, index: egodorsal.EgoDorsalIndex) -> list[str]:
  """Participant lists that cannot work (overlaps, unknown ids, an empty train set)."""
  if not data_config.leave_one_out:
    return []
  problems = []
  val = set(int(p) for p in data_config.val_participants)
  test = set(int(p) for p in data_config.test_participants)
  known = set(index.participants)
  for name, ids in (("val_participants", val), ("test_participants", test),
                    ("all_participant_ids", set(data_config.all_participant_ids))):
    unknown = sorted(int(p) for p in ids if int(p) not in known)
    if unknown:
      problems.append(f"data.{name}: participants {unknown} are not in the dataset "
                      f"(known: {sorted(known)})")
  if val & test:
    problems.append(f"data.leave_one_out: participants {sorted(val & test)} are in both "
                    "val_participants and test_participants")
  if not val or not test:
    problems.append("data.leave_one_out needs non-empty val_participants and test_participants")
  _, train = resolve_split(data_config, data_config.train_split, index)
  if not train:
    problems.append("data.leave_one_out: no participant left for training")
  return problems
