"""The preference datasets by name, and one loader: prepares a dataset's TFDS builder and reads a
split back as Preferences.

  prefs = load_preferences("anthropic_hh", "train", manual_dir="~/hh-rlhf", data_dir="~/tfds",
                           config="helpful-base")

Each builder (one module per dataset family: anthropic_hh, tldr, shp, taskmaster, jsonl) reads
files from a manual dir, laid out exactly as published, and writes array_record files that
`as_data_source()` reads back. Neither step needs TensorFlow or Apache Beam. What every builder
writes, and what it skips and why, is described in reading.py.

The skipped rows, the partial files, the dataset kind, the manual dir, the files read and their
fingerprint are saved by TFDS with the prepared data, in
`<data_dir>/<name>-<fingerprint[:12]>/<name>/[<config>/]<VERSION>/metadata.json` (the builder's
`info.metadata`), so loading an already prepared dataset reports them again. The folder is keyed on
`data_fingerprint` (the sha256 of every file the builder reads), so an edited file is prepared
afresh instead of the old cache being reused. A split with no usable rows stops the preparation.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from perl_jax import distributed
from perl_jax.data import anthropic_hh
from perl_jax.data import jsonl
from perl_jax.data import reading
from perl_jax.data import shp
from perl_jax.data import taskmaster
from perl_jax.data import tldr

PREFERENCE_DATASETS = ("anthropic_hh", "tldr_comparisons", "shp", "taskmaster",
                       "taskmaster_dialogs", "jsonl_preferences")


@dataclasses.dataclass
class Preferences:
  """One split of a dataset, column by column, and what was skipped reading it."""

  kind: str                 # "pairwise", "pointwise" or "demonstrations"
  prompts: list[str]
  chosen: list[str]         # for pointwise: the response
  rejected: list[str]       # for pointwise: ""
  labels: np.ndarray        # float32 [N]
  sources: list[str]        # "file:line" per row
  rows_skipped: int         # skipped rows plus the rows lost in files cut part-way
  skipped: list[str]        # "file:line: reason": each file cut part-way, then each skipped row
  conversation_ids: list[str] = dataclasses.field(default_factory=list)  # "" where none


BUILDERS = {cls.name: cls for cls in (
    anthropic_hh.AnthropicHh, tldr.TldrComparisons, shp.Shp, taskmaster.Taskmaster,
    taskmaster.TaskmasterDialogs, jsonl.JsonlPreferences)}
assert tuple(BUILDERS) == PREFERENCE_DATASETS


def _builder_class(name: str):
  if name not in BUILDERS:
    raise ValueError(f"unknown preference dataset {name!r}; known: {PREFERENCE_DATASETS}")
  return BUILDERS[name]


def _config_name(cls, config: str | None) -> str | None:
  """The builder config `config` names (None/"": the default), None for a builder without."""
  names = [c.name for c in cls.BUILDER_CONFIGS]
  if not names:
    if config:
      raise ValueError(f"{cls.name} has no configs; got config {config!r}: leave "
                       f"{reading.config_flag(cls.name, 'config')} empty")
    return None
  config = config or cls.DEFAULT_BUILDER_CONFIG_NAME
  if config not in names:
    raise ValueError(f"{cls.name} has no config {config!r}; it has {names} "
                     f"({reading.config_flag(cls.name, 'config')})")
  return config


def _path(path) -> str:
  return os.path.expanduser(os.fspath(path))


def check_manual_files(name: str, manual_dir: str, config: str | None) -> None:
  """Raises a one-line ValueError (MissingManualFiles, also a FileNotFoundError) naming the
  dataset, the config, the missing files or folders, what the manual dir holds and the fix, when
  the builder of `name` could not read its files from manual_dir. Cheap: it only lists folders."""
  cls = _builder_class(name)
  config = _config_name(cls, config)
  manual_dir = _path(manual_dir)
  if not os.path.isdir(manual_dir) or not os.listdir(manual_dir):
    raise cls._missing(manual_dir, config, [])
  cls.manual_files(manual_dir, config)


def _file_digest(path: str) -> dict:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def data_fingerprint(name: str, manual_dir: str, config: str | None = None) -> dict:
  """What the builder of `name` reads from manual_dir, by content: {"dataset", "config" (the
  builder config, its default if None; "" for a builder without), "builder_version", "files":
  {path relative to manual_dir: {"bytes", "sha256"}}, "sha256": one hash over all of it}.

  Content only: touching a file (its mtime) does not change it; editing one does. Raises
  MissingManualFiles like check_manual_files when files are absent.
  """
  cls = _builder_class(name)
  config = _config_name(cls, config)
  manual_dir = _path(manual_dir)
  check_manual_files(name, manual_dir, config)
  names = sorted({n for names in cls.manual_files(manual_dir, config).values() for n in names})
  fingerprint = {"dataset": name, "config": config or "", "builder_version": str(cls.VERSION),
                 "files": {n: _file_digest(os.path.join(manual_dir, n)) for n in names}}
  fingerprint["sha256"] = hashlib.sha256(
      json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()
  return fingerprint


def _prepared_earlier(cls, data_dir: str, config: str | None) -> list:
  """Builders of the datasets prepared under data_dir (one folder per fingerprint)."""
  prepared = []
  for folder in sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{cls.name}-*"))):
    builder = cls(data_dir=folder, config=config, file_format="array_record")
    if _is_prepared(builder):
      prepared.append(builder)
  return prepared


def _is_prepared(builder) -> bool:
  # is_prepared() alone warns about a variant folder without dataset_info.json, which TFDS
  # writes when the preparation is complete.
  return (os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))
          and builder.is_prepared())


def prepared_builder(name: str, manual_dir: str, data_dir: str, config: str | None = None):
  """The builder of `name`, its array_record files prepared if they were not.

  The data is prepared into `<data_dir>/<name>-<fingerprint sha256[:12]>`, so a changed file in
  manual_dir gives a fresh preparation. When manual_dir is absent and data_dir holds exactly one
  preparation of the dataset, that one is read (and said so). With several processes, process
  0 prepares and the others wait, then read.
  """
  return distributed.primary_first(
      lambda: _prepared_builder(name, manual_dir, data_dir, config), f"prepare {name}")


def _prepared_builder(name: str, manual_dir: str, data_dir: str, config: str | None):
  cls = _builder_class(name)
  config = _config_name(cls, config)
  manual_dir, data_dir = _path(manual_dir), _path(data_dir)
  label = name + (f"/{config}" if config else "")
  tfds.disable_progress_bar()  # our stages print their own progress lines
  if not os.path.isdir(manual_dir):
    earlier = _prepared_earlier(cls, data_dir, config)
    if len(earlier) == 1:
      print(f"[data] {label}: manual dir {manual_dir} is absent; reading what was prepared from "
            f"{earlier[0].info.metadata.get('manual_dir')} in {earlier[0].data_dir}", flush=True)
      return earlier[0]
  fingerprint = data_fingerprint(name, manual_dir, config)  # checks the manual files first
  builder = cls(data_dir=os.path.join(data_dir, f"{name}-{fingerprint['sha256'][:12]}"),
                config=config, file_format="array_record")
  if _is_prepared(builder):
    return builder
  print(f"[data] preparing {label} from {manual_dir} into {builder.data_dir} ...", flush=True)
  started = time.time()
  builder.info.metadata["fingerprint"] = fingerprint
  builder.download_and_prepare(
      file_format="array_record",
      download_dir=os.path.join(data_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  metadata = builder.info.metadata
  rows = ", ".join(f"{split} {info.num_examples}" for split, info in builder.info.splits.items())
  skipped = sum(map(len, metadata["skipped"].values()))
  cuts = sum(map(len, metadata["partial"].values()))
  print(f"[data] prepared {label}: {rows} rows ({skipped} malformed rows skipped"
        f"{f', {cuts} files unreadable part-way' if cuts else ''}) in "
        f"{time.time() - started:.1f} s", flush=True)
  return builder


def _partial_message(name: str, cuts: list[dict], manual_dir: str) -> str:
  first = cuts[0]
  text = f"{name}: {os.path.join(manual_dir, first['file'])} is {reading.describe_cut(first)}"
  for cut in cuts[1:]:
    text += f"; and {cut['file']} is {reading.describe_cut(cut)}"
  return text


def load_preferences(name: str, split: str, manual_dir: str, data_dir: str,
                     config: str | None = None, allow_partial: bool = False) -> Preferences:
  """All rows of one split, in file order, preparing the dataset first if needed.

  If a file of the dataset (any split) stopped being readable part-way: PartialFileError, unless
  allow_partial, which prints a warning line and counts the lost rows in rows_skipped (of the
  split the cut is reported with).
  """
  builder = prepared_builder(name, manual_dir, data_dir, config)
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  metadata = builder.info.metadata
  partial = metadata.get("partial", {})
  every_cut = [cut for cuts in partial.values() for cut in cuts]
  if every_cut:
    message = _partial_message(name, every_cut, metadata.get("manual_dir", _path(manual_dir)))
    if not allow_partial:
      raise reading.PartialFileError(
          f"{message}. Repair or copy the file again, or set "
          f"{reading.config_flag(name, 'allow_partial')}=True to train on the rows read")
    print(f"[data] warning: {message}; allow_partial=True: training on the rows read, the lost "
          "rows counted as skipped", flush=True)
  source = builder.as_data_source(split=split)
  columns = {key: [] for key in reading.TEXT_FIELDS}
  labels = np.zeros(len(source), np.float32)
  chunk = 1024
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    for index, example in zip(indices, source.__getitems__(indices)):
      for key in reading.TEXT_FIELDS:
        columns[key].append(example[key].decode("utf-8"))
      labels[index] = example["label"]
  cuts = partial.get(split, [])
  skipped = list(metadata["skipped"].get(split, []))
  rows_skipped = len(skipped) + sum(cut["rows_lost"] or 0 for cut in cuts)
  skipped = [f"{cut['file']}:{cut['line']}: {reading.describe_cut(cut)}" for cut in cuts] + skipped
  return Preferences(
      kind=metadata["kind"], prompts=columns["prompt"], chosen=columns["chosen"],
      rejected=columns["rejected"], labels=labels, sources=columns["source"],
      rows_skipped=rows_skipped, skipped=skipped, conversation_ids=columns["conversation_id"])
