"""Preference and reward data: TFDS builders for the published formats, and one loader.

Each builder reads files from a manual dir, laid out exactly as published, and writes array_record
files that `as_data_source()` reads back. Neither step needs TensorFlow or Apache Beam.

  prefs = load_preferences("anthropic_hh", "train", manual_dir="~/hh-rlhf", data_dir="~/tfds",
                           config="helpful-base")

Every builder writes one schema, so the code downstream never branches on the source:
  prompt           the shared context (HH: up to and including the last shared "\n\nAssistant:")
  chosen           pairwise: the preferred response; pointwise and demonstrations: the response
  rejected         pairwise: the other response; otherwise ""
  label            float32: 1.0 for pairwise rows and demonstrations, the 0/1 label for pointwise
                   rows
  source           "file:line" of the row (path relative to the manual dir; for a JSON array the
                   line where the row's object starts)
  conversation_id  the published id of the post or dialog the row comes from, "" when none
Responses are stripped of surrounding whitespace; prompts are kept as published.

A malformed row (bad JSON, undecodable text, missing or non-string field, empty response, identical
chosen and rejected, label not 0/1) is never written and never silently dropped: it is listed as
"file:line: reason" under the split that holds it (a dialog that yields several examples is
kept or skipped whole). An empty agent turn in the Taskmaster reward examples is not malformed:
it is a labelled response (""). A file that stops being readable part-way (truncated, corrupt) is
recorded with the line where reading stopped and the rows lost (counted where the rest of the text
allows, else "unknown"); `load_preferences` then fails with PartialFileError unless
allow_partial=True, which counts the lost rows as skipped.

The list, the partial files, the dataset kind ("pairwise", "pointwise" or "demonstrations": SFT
examples, e.g. taskmaster_dialogs), the manual dir, the files read and their fingerprint are saved
by TFDS with the prepared data, in
`<data_dir>/<name>-<fingerprint[:12]>/<name>/[<config>/]<VERSION>/metadata.json` (the builder's
`info.metadata`), so loading an already prepared dataset reports them again. The folder is keyed on
`data_fingerprint` (the sha256 of every file the builder reads), so an edited file is prepared
afresh instead of the old cache being reused. A split with no usable rows stops the preparation.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import logging
import os
import re
import time
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from perl_jax import errors

PREFERENCE_DATASETS = ("anthropic_hh", "tldr_comparisons", "shp", "taskmaster",
                       "taskmaster_dialogs", "jsonl_preferences")
PAIRWISE, POINTWISE, DEMONSTRATIONS = "pairwise", "pointwise", "demonstrations"
_VERSION = "1.1.0"
_RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Taskmaster keeps empty agent turns; files cut part-way recorded in metadata.",
}
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "source", "conversation_id")


@dataclasses.dataclass
class Preferences:
  kind: str                 # "pairwise", "pointwise" or "demonstrations"
  prompts: list[str]
  chosen: list[str]         # for pointwise: the response
  rejected: list[str]       # for pointwise: ""
  labels: np.ndarray        # float32 [N]
  sources: list[str]        # "file:line" per row
  rows_skipped: int         # skipped rows plus the rows lost in files cut part-way
  skipped: list[str]        # "file:line: reason": each file cut part-way, then each skipped row
  conversation_ids: list[str] = dataclasses.field(default_factory=list)  # "" where none


# ---------------------------------------------------------------------------------------------
# Reading rows. A reader yields (source, value, error) per row: value is the parsed JSON, error
# is "" or why the row could not be read. When the file stops being readable part-way, the reader
# raises FileCut after the last row it could read.
# ---------------------------------------------------------------------------------------------

Row = tuple[str, Any, str]


class PartialFileError(errors.UserError, ValueError):
  """A file stopped being readable part-way and allow_partial is False; the message says which,
  from which line, how many rows were lost and how to train on what was read."""


class MissingManualFiles(errors.UserError, FileNotFoundError, ValueError):
  """The manual dir lacks files the builder (and its config) reads; a one-line message."""


class FileCut(Exception):
  """Raised by a reader once the rest of its file cannot be read.

  cut: {"file", "line" (where reading stopped), "rows_lost" (int, or None when it cannot be
  counted), "at_least" (True when more rows may be lost than counted), "reason"}.
  """

  def __init__(self, name: str, line: int, rows_lost: int | None, at_least: bool, reason: str):
    super().__init__(reason)
    self.cut = dict(file=name, line=line, rows_lost=rows_lost, at_least=at_least,
                    reason=" ".join(reason.split()))


def describe_cut(cut: dict) -> str:
  """"unreadable from line N (R rows lost): reason" of one FileCut.cut."""
  n = cut["rows_lost"]
  if n is None:
    lost = "an unknown number of rows lost: the rest of the file"
  else:
    lost = f"{'at least ' if cut['at_least'] else ''}{n} row{'' if n == 1 else 's'} lost"
    if cut["at_least"]:
      lost += ": the file ends before its JSON array closes"
  return f"unreadable from line {cut['line']} ({lost}): {cut['reason']}"


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _json_line(name: str, line_number: int, raw_line: bytes) -> Row | None:
  source = f"{name}:{line_number}"
  try:
    line = raw_line.decode("utf-8")
  except UnicodeDecodeError as e:
    return source, None, f"undecodable UTF-8 text at byte {e.start}"
  if line_number == 1:
    line = line.lstrip("\ufeff")
  if not line.strip():
    return None
  try:
    return source, json.loads(line), ""
  except json.JSONDecodeError as e:
    return source, None, f"bad JSON: {e.msg} at column {e.colno}"


def _read_json_lines(path: str, name: str) -> Iterator[Row]:
  """One JSON value per line (gzipped if the name ends in .gz); blank lines are not rows.

  A gzip stream that breaks (truncated or corrupt) raises FileCut: the rows after the break cannot
  be known. A last line without its newline is held back until the stream is known to end well.
  """
  line_number, held = 0, None
  with _open_bytes(path) as f:
    try:
      for line_number, raw_line in enumerate(f, start=1):
        if not raw_line.endswith(b"\n"):
          held = raw_line  # only the last line lacks one
          continue
        row = _json_line(name, line_number, raw_line)
        if row:
          yield row
    except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt gzip stream
      first_lost = line_number if held is not None else line_number + 1
      raise FileCut(name, first_lost, None, False, f"{type(e).__name__}: {e}") from None
  if held is not None:
    row = _json_line(name, line_number, held)
    if row:
      yield row


# A JSON string (never across a newline: JSON strings hold none) or a bracket.
_JSON_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"?|[{}\[\]]')


def _rows_from(text: str, pos: int, first_row: int) -> tuple[int, bool]:
  """(rows of a JSON array starting at or after pos, whether the array closes): the rows lost
  when the array stops being readable at pos.

  A pretty-printed array (its first row, at first_row, opens a line) is counted by the lines
  that open a row at the first row's indentation, which a corrupt stretch cannot confuse; other
  arrays by the brackets at the array's top level, strings skipped.
  """
  indent = text[text.rfind("\n", 0, first_row) + 1:first_row]
  if not indent.strip():
    opens_row = re.compile("^" + re.escape(indent) + r"[^\s\]}]", re.M)
    count = sum(1 for match in opens_row.finditer(text, text.rfind("\n", 0, pos) + 1)
                if match.end() > pos)
    last_line = text.rstrip().rsplit("\n", 1)[-1]  # "]" less indented than the rows: the end
    closing_indent = len(last_line) - len(last_line.lstrip())
    return count, last_line.strip() == "]" and (closing_indent < len(indent) or not indent)
  depth, count = 0, 0
  for match in _JSON_TOKENS.finditer(text, pos):
    token = match.group()
    if token in ("{", "["):
      count += depth == 0
      depth += 1
    elif token == "]" and depth == 0:
      return count, True
    elif token in ("}", "]"):
      depth = max(depth - 1, 0)
  return count, False


def _read_json_rows(path: str, name: str) -> Iterator[Row]:
  """A JSON array of rows (source = line where each row starts), or JSON lines.

  When the array stops being readable, raises FileCut counting the rows that start in the unread
  text (at least that many if the file ends before the array closes).
  """
  with open(path, "rb") as f:
    # Undecodable bytes become lone surrogates, which the UTF-8 check on each row's text catches.
    text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
  start = len(text) - len(text.lstrip())
  if not text[start:].startswith("["):
    yield from _read_json_lines(path, name)
    return
  decoder = json.JSONDecoder()
  line, counted_to = 1, 0

  def skip_space(pos):
    while pos < len(text) and text[pos] in " \t\r\n":
      pos += 1
    return pos

  def line_at(pos):
    nonlocal line, counted_to
    line += text.count("\n", counted_to, pos)
    counted_to = pos
    return line

  def cut(pos, reason):
    rows, closes = _rows_from(text, pos, first_row)
    return FileCut(name, line_at(pos), rows if rows or closes else None, not closes, reason)

  pos = first_row = skip_space(start + 1)
  if text[pos:pos + 1] == "]":
    return
  while True:
    source = f"{name}:{line_at(pos)}"
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise cut(pos, f"bad JSON: {e.msg} (line {e.lineno} column {e.colno})") from None
    yield source, value, ""
    pos = skip_space(end)
    if text[pos:pos + 1] == ",":
      pos = skip_space(pos + 1)
    elif text[pos:pos + 1] == "]":
      return
    else:
      raise cut(pos, "bad JSON: expected ',' or ']' after a row")


# ---------------------------------------------------------------------------------------------
# Checking fields. A parser turns one JSON value into an example dict, or returns a reason string.
# ---------------------------------------------------------------------------------------------

class MalformedRow(ValueError):
  """A row that cannot become an example; the message is the reason."""


def _field(row: Any, key: str, kind: type | tuple = str):
  if not isinstance(row, dict):
    raise MalformedRow(f"a JSON {type(row).__name__} where an object with {key!r} was expected")
  if key not in row:
    raise MalformedRow(f"missing field {key!r}")
  value = row[key]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise MalformedRow(f"field {key!r} is {type(value).__name__}, not {_type_names(kind)}")
  return value


def _type_names(kind) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  names = {"str": "a string", "dict": "an object", "list": "a list"}
  return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _binary_label(value: Any, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
    raise MalformedRow(f"field {key!r} is {value!r}, not 0 or 1")
  return float(value)


def _check_example(example: dict, kind: str, empty_responses: bool = False) -> None:
  """MalformedRow unless the example's text is valid and its responses usable; empty_responses:
  a pointwise "" response is a labelled row (Taskmaster's empty agent turns)."""
  for key in _TEXT_FIELDS:
    try:
      example[key].encode("utf-8")
    except UnicodeEncodeError:
      raise MalformedRow(f"{key} is not valid UTF-8 text (undecodable bytes or lone surrogate)")
  if kind == PAIRWISE:
    if not example["chosen"]:
      raise MalformedRow("empty chosen response")
    if not example["rejected"]:
      raise MalformedRow("empty rejected response")
    if example["chosen"] == example["rejected"]:
      raise MalformedRow("identical chosen and rejected responses")
  elif not example["chosen"] and not (empty_responses and kind == POINTWISE):
    raise MalformedRow("empty response")


def _pairwise(prompt: str, chosen: str, rejected: str, conversation_id: str = "") -> dict:
  return dict(prompt=prompt, chosen=chosen.strip(), rejected=rejected.strip(), label=1.0,
              conversation_id=conversation_id)


def _pointwise(prompt: str, response: str, label: float, conversation_id: str = "") -> dict:
  return dict(prompt=prompt, chosen=response.strip(), rejected="", label=label,
              conversation_id=conversation_id)


# ---------------------------------------------------------------------------------------------
# The shared builder: schema, manual-dir checks, the skipped-row report.
# ---------------------------------------------------------------------------------------------

def _listing(folder: str, limit: int = 12) -> str:
  """The entries of folder, folders with a trailing "/", hidden ones left out."""
  try:
    entries = sorted(e + "/" if os.path.isdir(os.path.join(folder, e)) else e
                     for e in os.listdir(folder) if not e.startswith("."))
  except OSError:
    return "nothing (the folder does not exist)"
  if not entries:
    return "nothing (the folder is empty)"
  more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
  return ", ".join(entries[:limit]) + more


def _flag(name: str, field: str) -> str:
  """The command-line flag that sets `field` of the config block reading dataset `name`: the
  task's dialogs are config.data, the reward stage's data config.reward.data."""
  return f"--config.{'data' if name == 'taskmaster_dialogs' else 'reward.data'}.{field}"


def _first_file(manual_dir: str, *candidates: str) -> str | None:
  return next((c for c in candidates if os.path.isfile(os.path.join(manual_dir, c))), None)


class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the unified schema; subclasses say which files feed which split and parse a row."""

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = _RELEASE_NOTES
  KIND = PAIRWISE
  EMPTY_RESPONSES = False  # True: a pointwise "" response is a labelled row, not a malformed one
  # TFDS looks for a checksums file beside a builder's code through the `importlib_resources`
  # backport, which it does not declare (and which is not installed). These builders download
  # nothing, so they have no checksums and no code path to search.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    text = {key: tfds.features.Text() for key in _TEXT_FIELDS}
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({**text, "label": tfds.features.Scalar(np.float32)}),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # rows come back in file order
    )

  # download_and_prepare prints "Downloading and preparing dataset Unknown size ..." and "...
  # Subsequent calls will reuse this data."; prepared_builder prints its own lines instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  @classmethod
  def manual_files(cls, manual_dir: str, config: str | None) -> dict[str, list[str]]:
    """{split: files relative to manual_dir} that the builder reads for `config` (a config name,
    or None for a builder without configs); MissingManualFiles, one line, if some are absent."""
    raise NotImplementedError

  @classmethod
  def _missing(cls, manual_dir: str, config: str | None, missing: list[str],
               fix: str = "") -> MissingManualFiles:
    """The error for files or folders `missing` ([] when manual_dir is absent or empty)."""
    where = cls.name + (f" (config {config!r})" if config else "")
    fix = fix or (f"copy the published files there or point {_flag(cls.name, 'manual_dir')} at "
                  f"them; expected: {' '.join(cls.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}")
    problem = (f"lacks {', '.join(missing)}; it holds {_listing(manual_dir)}" if missing else
               "does not exist" if not os.path.isdir(manual_dir) else "is empty")
    return MissingManualFiles(f"{where}: manual dir {manual_dir} {problem}; fix: {fix}")

  def _manual_dir(self, dl_manager) -> str:
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS' "does not exist or is empty", with the instructions
      raise FileNotFoundError(f"{self.name}: {e}") from e
    self.info.metadata["manual_dir"] = os.path.abspath(manual_dir)
    self.info.metadata.setdefault("kind", self.KIND)
    self.info.metadata.setdefault("skipped", {})
    self.info.metadata.setdefault("partial", {})
    self.info.metadata.setdefault("files", {})
    return manual_dir

  def _split_files(self, dl_manager) -> tuple[str, dict[str, list[str]]]:
    manual_dir = self._manual_dir(dl_manager)
    config = self.builder_config.name if self.BUILDER_CONFIGS else None
    return manual_dir, self.manual_files(manual_dir, config)

  def _generate_examples(self, split: str, manual_dir: str, names: list[str],
                         reader: Callable[[str, str], Iterator[Row]] = _read_json_lines,
                         keep: Callable[[str, Any], bool] | None = None):
    """Generator of one split's examples from the files `names` (relative to manual_dir).

    keep(source, value), if given, says whether a row (read or not) belongs to this split; a file
    cut part-way counts against the split that keep(source of the cut, None) names.
    """
    self.info.metadata["files"][split] = names
    skipped, cuts, usable = [], [], 0
    for name in names:
      try:
        for source, value, error in reader(os.path.join(manual_dir, name), name):
          if keep is not None and not keep(source, value):
            continue
          try:
            if error:
              raise MalformedRow(error)
            parsed = self._parse(value)
            examples = parsed if isinstance(parsed, list) else [parsed]
            for example in examples:
              example["source"] = source
              _check_example(example, self.info.metadata["kind"], self.EMPTY_RESPONSES)
          except MalformedRow as e:
            skipped.append(f"{source}: {e}")
            continue
          usable += len(examples)
          if isinstance(parsed, list):  # one row, several examples (a dialog's agent turns)
            for index, example in enumerate(examples):
              yield f"{source}#{index}", example
          else:
            yield source, parsed
      except FileCut as e:
        if keep is None or keep(f"{name}:{e.cut['line']}", None):
          cuts.append(e.cut)
          logging.warning("%s/%s: %s %s", self.name, split, name, describe_cut(e.cut))
    self.info.metadata["skipped"][split] = skipped
    self.info.metadata["partial"][split] = cuts
    if skipped:
      logging.warning("%s/%s: skipped %d malformed rows, e.g. %s", self.name, split, len(skipped),
                      skipped[0])
    if not usable:
      cut_files = "".join(f"; {cut['file']} {describe_cut(cut)}" for cut in cuts)
      raise ValueError(
          f"{self.name}: split {split!r} has no usable rows in {names} under {manual_dir} "
          f"({len(skipped)} malformed rows, first: {skipped[:3]}{cut_files})")

  @classmethod
  def _taskmaster_files(cls, manual_dir: str, folder: str, prefix: str) -> list[str]:
    """`<prefix>*.json` in manual_dir/<folder>/ (the TM-4-2024 layout) or in manual_dir."""
    where = folder if os.path.isdir(os.path.join(manual_dir, folder)) else ""
    names = sorted(os.path.join(where, f) for f in os.listdir(os.path.join(manual_dir, where))
                   if f.startswith(prefix) and f.endswith(".json"))
    if not names:
      raise cls._missing(manual_dir, None, [f"{folder}/{prefix}*.json (or {prefix}*.json)"])
    return names

  def _parse(self, row: Any) -> dict | list[dict]:
    """One JSON value as an example dict (without source), or a list of them, or MalformedRow
    saying why not (a row's examples are kept or skipped together)."""
    raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# Anthropic HH-RLHF.
# ---------------------------------------------------------------------------------------------

_HH_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman:"


def split_hh_dialog(chosen: str, rejected: str) -> tuple[str, str, str]:
  """(prompt, chosen response, rejected response) of one HH-RLHF pair.

  The prompt is the shared text up to and including its last "\n\nAssistant:"; the responses are
  what follows, stripped. Raises MalformedRow for identical pairs, pairs without a shared
  "\n\nAssistant:", and pairs that differ before the final assistant turn.
  """
  if chosen == rejected:
    raise MalformedRow("identical chosen and rejected")
  shared = os.path.commonprefix([chosen, rejected])
  cut = shared.rfind(_ASSISTANT)
  if cut < 0:
    raise MalformedRow("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
  end = cut + len(_ASSISTANT)
  chosen_response, rejected_response = chosen[end:].strip(), rejected[end:].strip()
  if _HUMAN in chosen_response or _HUMAN in rejected_response:
    raise MalformedRow("chosen and rejected differ before the final assistant turn")
  return chosen[:end], chosen_response, rejected_response


class AnthropicHh(_PreferenceBuilder, skip_registration=True):
  """Anthropic HH-RLHF helpfulness/harmlessness pairs (Bai et al. 2022)."""

  name = "anthropic_hh"
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=subset, description=f"the {subset} subset")
                     for subset in _HH_SUBSETS] + [
                         tfds.core.BuilderConfig(name="all", description="all four subsets")]
  DEFAULT_BUILDER_CONFIG_NAME = "all"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Clone https://huggingface.co/datasets/Anthropic/hh-rlhf (or github.com/anthropics/hh-rlhf) and
  pass its root as the manual dir: it holds harmless-base/, helpful-base/, helpful-online/ and
  helpful-rejection-sampled/, each with train.jsonl.gz and test.jsonl.gz (gunzipped .jsonl also
  accepted). red-team-attempts/ is not preference data and is not read.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    found = {(subset, split): _first_file(manual_dir, f"{subset}/{split}.jsonl.gz",
                                          f"{subset}/{split}.jsonl")
             for subset in _HH_SUBSETS for split in ("train", "test")}
    subsets = _HH_SUBSETS if config == "all" else (config,)
    missing = []
    for subset in subsets:
      if not os.path.isdir(os.path.join(manual_dir, subset)):
        missing.append(f"{subset}/")
      else:
        missing += [f"{subset}/{split}.jsonl.gz" for split in ("train", "test")
                    if not found[subset, split]]
    if missing:
      complete = [subset for subset in _HH_SUBSETS
                  if found[subset, "train"] and found[subset, "test"]]
      flag = _flag(cls.name, "config")
      fix = (f"read the subset{'s' if len(complete) > 1 else ''} present with "
             + " or ".join(f"{flag}={subset}" for subset in complete) if complete else
             f"point {_flag(cls.name, 'manual_dir')} at a clone of huggingface.co/datasets/"
             "Anthropic/hh-rlhf (each subset folder holds train.jsonl.gz and test.jsonl.gz)")
      raise cls._missing(manual_dir, config, missing, fix)
    return {split: [found[subset, split] for subset in subsets] for split in ("train", "test")}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names)
            for split, names in files.items()}

  def _parse(self, row):
    prompt, chosen, rejected = split_hh_dialog(_field(row, "chosen"), _field(row, "rejected"))
    return _pairwise(prompt, chosen, rejected)


# ---------------------------------------------------------------------------------------------
# OpenAI summarize-from-feedback (TL;DR) comparisons.
# ---------------------------------------------------------------------------------------------

_TLDR_SPLITS = {"train": ("train",), "validation": ("valid1", "valid2")}
_CNNDM_FILES = ("batch0_cnndm.json",)


class TldrComparisons(_PreferenceBuilder, skip_registration=True):
  """Human comparisons of Reddit TL;DR summaries (Stiennon et al. 2020)."""

  name = "tldr_comparisons"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Copy the comparisons of github.com/openai/summarize-from-feedback (batch*.json under
  https://openaipublic.blob.core.windows.net/summarize-from-feedback/dataset/comparisons/)
  into <manual_dir>/comparisons/. Each file is JSON lines: {info: {id, post, title, subreddit},
  summaries: [{text, policy, note}, {...}], choice, split: train|valid1|valid2, worker, batch}.
  batch0_cnndm.json (CNN/DM news articles, not Reddit posts) is not read.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    folder = "comparisons" if os.path.isdir(os.path.join(manual_dir, "comparisons")) else ""
    names = sorted(
        os.path.join(folder, f) if folder else f
        for f in os.listdir(os.path.join(manual_dir, folder))
        if f.startswith("batch") and f.endswith(".json") and f not in _CNNDM_FILES)
    if not names:
      raise cls._missing(manual_dir, config, ["comparisons/batch*.json"])
    return {split: names for split in _TLDR_SPLITS}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names, keep=self._keep(split))
            for split, names in files.items()}

  @staticmethod
  def _keep(split: str) -> Callable[[str, Any], bool]:
    """Rows whose split field cannot be read are reported with the train split."""
    def keep(source, row):
      value = row.get("split") if isinstance(row, dict) else None
      if not any(value in names for names in _TLDR_SPLITS.values()):
        return split == "train"
      return value in _TLDR_SPLITS[split]
    return keep

  def _parse(self, row):
    value = row.get("split") if isinstance(row, dict) else None
    if not any(value in names for names in _TLDR_SPLITS.values()):
      raise MalformedRow(f"field 'split' is {value!r}, not one of train, valid1, valid2")
    info = _field(row, "info", dict)
    if info.get("post") is None and info.get("article") is not None:
      raise MalformedRow("a CNN/DM article, not a Reddit post")
    post, title, subreddit = (_field(info, key) for key in ("post", "title", "subreddit"))
    summaries = _field(row, "summaries", list)
    if len(summaries) != 2:
      raise MalformedRow(f"{len(summaries)} summaries, not 2")
    texts = [_field(summary, "text") for summary in summaries]
    choice = int(_binary_label(_field(row, "choice", int), "choice"))
    prompt = f"SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
    conversation_id = info.get("id") if isinstance(info.get("id"), str) else ""
    return _pairwise(prompt, texts[choice], texts[1 - choice], conversation_id)


# ---------------------------------------------------------------------------------------------
# Stanford Human Preferences (SHP).
# ---------------------------------------------------------------------------------------------

_SHP_SPLITS = ("train", "validation", "test")


class Shp(_PreferenceBuilder, skip_registration=True):
  """Stanford Human Preferences: pairs of Reddit comments ranked by score (Ethayarajh et al.)."""

  name = "shp"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Clone https://huggingface.co/datasets/stanfordnlp/SHP and pass its root as the manual dir: one
  folder per subreddit (askacademia/, askhr/, ...), each with train.json, validation.json and
  test.json in JSON lines (post_id, history, human_ref_A, human_ref_B, labels, ...).
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    subreddits = sorted(
        d for d in os.listdir(manual_dir)
        if any(os.path.isfile(os.path.join(manual_dir, d, f"{s}.json")) for s in _SHP_SPLITS))
    files = {split: [f"{d}/{split}.json" for d in subreddits] for split in _SHP_SPLITS}
    missing = [name for names in files.values() for name in names
               if not os.path.isfile(os.path.join(manual_dir, name))]
    if not subreddits or missing:
      raise cls._missing(manual_dir, config,
                         missing or ["<subreddit>/train.json, validation.json, test.json"])
    return files

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)
    return {split: self._generate_examples(split, manual_dir, names)
            for split, names in files.items()}

  def _parse(self, row):
    history, ref_a, ref_b = (_field(row, key) for key in ("history", "human_ref_A", "human_ref_B"))
    a_preferred = _binary_label(_field(row, "labels", (int, float)), "labels") == 1.0
    chosen, rejected = (ref_a, ref_b) if a_preferred else (ref_b, ref_a)
    post_id = row.get("post_id") if isinstance(row.get("post_id"), str) else ""
    return _pairwise(history, chosen, rejected, post_id)


# ---------------------------------------------------------------------------------------------
# Taskmaster-4 Coffee reward examples (the PERL paper's release).
# ---------------------------------------------------------------------------------------------

TASKMASTER_TEST_PERCENT = 10


def render_taskmaster_turn(turn: Any) -> str:
  """One turn as a line: "User: ...", "Agent: ...", "Agent: [call] name {args}",
  "API: [result] name {response}"."""
  if not isinstance(turn, dict):
    raise MalformedRow(f"a turn is a JSON {type(turn).__name__}, not an object")
  speaker = {"user": "User", "agent": "Agent", "api": "API"}.get(turn.get("role"))
  if speaker is None:
    raise MalformedRow(f"a turn has role {turn.get('role')!r}, not user, agent or api")
  return f"{speaker}: {render_taskmaster_content(turn)}"


def render_taskmaster_content(turn: dict) -> str:
  """What a turn says: its text, or its API call or result as `[kind] name {json}`."""
  if isinstance(turn.get("text"), str):
    return turn["text"]
  for key, tag in (("api", "call"), ("response", "result")):
    if isinstance(turn.get(key), dict) and turn[key]:
      return "; ".join(f"[{tag}] {name} {json.dumps(value, ensure_ascii=False)}"
                       for name, value in turn[key].items())
  raise MalformedRow(f"a {turn.get('role')} turn has no text, api or response")


def taskmaster_dialog_key(row: Any, source: str) -> str:
  """The key that keeps a dialog on one side of the split.

  Published conversation_ids are unique per row, although consecutive rows are steps of one dialog
  (each row's context extends an earlier row's), so the key is the dialog's opening up to its
  first user turn; rows without a user turn fall back to conversation_id, then to the source.
  """
  if isinstance(row, dict):
    try:
      turns = json.loads(row.get("context"))
      for turn in turns:
        if turn.get("role") == "user" and isinstance(turn.get("text"), str):
          return "user:" + turn["text"]
    except (TypeError, ValueError, AttributeError):
      pass
    if isinstance(row.get("conversation_id"), str):
      return "conversation_id:" + row["conversation_id"]
  return "source:" + source


def taskmaster_bucket(key: str) -> int:
  """0-99 from a sha256 of a dialog key: the reward rows and the dialogs share one split."""
  digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
  return int.from_bytes(digest[:8], "big") % 100


def taskmaster_split(row: Any, source: str) -> str:
  bucket = taskmaster_bucket(taskmaster_dialog_key(row, source))
  return "test" if bucket < TASKMASTER_TEST_PERCENT else "train"


class Taskmaster(_PreferenceBuilder, skip_registration=True):
  """Taskmaster-4 (TM-4-2024) Coffee reward examples released with PERL (arXiv 2403.10704)."""

  name = "taskmaster"
  KIND = POINTWISE
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Copy TM-4-2024/reward/reward_*.json of github.com/google-research-datasets/Taskmaster (CC BY 4.0)
  and pass that folder, or the folder above it holding reward/, as the manual dir. Each file is a
  JSON array of {conversation_id, context (JSON string: list of turns), generation (JSON string:
  one agent turn), reward (0.0 or 1.0)}. There are no published splits: rows are split by a
  sha256 of the dialog's opening (see taskmaster_dialog_key), 10% test.
  """

  EMPTY_RESPONSES = True  # an empty agent turn is a labelled response (a real negative)

  @classmethod
  def manual_files(cls, manual_dir, config):
    names = cls._taskmaster_files(manual_dir, "reward", "reward_")
    return {"train": names, "test": names}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)

    def keep(split):
      def keep_row(source, row):  # unreadable rows are reported with the train split
        return split == "train" if row is None else taskmaster_split(row, source) == split
      return keep_row

    return {split: self._generate_examples(split, manual_dir, names, reader=_read_json_rows,
                                           keep=keep(split))
            for split, names in files.items()}

  def _parse(self, row):
    conversation_id = _field(row, "conversation_id")
    generation_text = _field(row, "generation")
    try:
      turns = json.loads(_field(row, "context"))
      generation = json.loads(generation_text) if generation_text.strip() else {"role": "agent"}
    except json.JSONDecodeError as e:
      raise MalformedRow(f"context or generation is not JSON: {e.msg}")
    if not isinstance(turns, list):
      raise MalformedRow("context is not a JSON list of turns")
    if generation == {}:
      generation = {"role": "agent"}
    if not isinstance(generation, dict) or generation.get("role") != "agent":
      raise MalformedRow("generation is not an agent turn")
    label = _binary_label(_field(row, "reward", (int, float)), "reward")
    # An empty agent turn ("", "{}", no text, blank text) is a labelled response: "".
    empty = not any(generation.get(key) for key in ("text", "api", "response"))
    response = "" if empty else render_taskmaster_content(generation)
    return _pointwise(taskmaster_prompt(turns), response, label, conversation_id)


# The Taskmaster-4 Coffee dialogs: demonstrations (context, next agent turn) for SFT and RL prompts.
TASKMASTER_RL_PERCENT = 20  # dialog buckets [10, 30): RL training prompts; [30, 100): SFT


def taskmaster_dialog_turns(dialog: Any) -> list[dict]:
  """A published dialog as turns in the reward examples' format.

  Each utterance becomes a user or agent text turn; the API calls annotated on it follow it, in
  order: {"role": "agent", "api": {name: request}} then {"role": "api", "response": {name:
  response}}, as the reward examples' contexts write them.
  """
  utterances = _field(dialog, "utterances", list)
  turns = []
  for position, utterance in enumerate(utterances):
    role = {"user": "user", "assistant": "agent"}.get(
        utterance.get("speaker") if isinstance(utterance, dict) else None)
    if role is None:
      raise MalformedRow(f"utterance {position}: speaker is not 'user' or 'assistant'")
    turns.append({"role": role, "text": _field(utterance, "text")})
    groups: dict[str, dict] = {}  # annotation context ("api_call_0") -> its parts, in order
    for annotation in utterance.get("annotations") or []:
      name, value, context = (_field(annotation, key) for key in ("name", "value", "context"))
      groups.setdefault(context, {})[name] = value
    for context, parts in groups.items():
      kind, payload = (("api_call", "request") if "api_call" in parts
                       else ("api_response", "response"))
      if kind == "api_call":
        parts.setdefault("request", "{}")  # published calls without arguments (show_menu)
      if kind not in parts or payload not in parts:
        raise MalformedRow(f"utterance {position}: annotation {context!r} lacks {kind!r} or "
                           f"{payload!r}")
      try:
        value = json.loads(parts[payload])
      except json.JSONDecodeError as e:
        raise MalformedRow(f"utterance {position}: {payload} of {context!r} is not JSON: {e.msg}")
      turns.append({"role": "agent", "api": {parts[kind]: value}} if kind == "api_call"
                   else {"role": "api", "response": {parts[kind]: value}})
  if not any(turn["role"] == "user" for turn in turns):
    raise MalformedRow("a dialog without a user turn")
  return turns


def taskmaster_prompt(turns: list[dict]) -> str:
  """The context the next agent turn answers, as the reward examples render it."""
  return "\n".join([render_taskmaster_turn(turn) for turn in turns] + ["Agent:"])


def taskmaster_dialog_split(turns: list[dict]) -> str:
  first_user = next(turn["text"] for turn in turns if turn["role"] == "user")
  bucket = taskmaster_bucket("user:" + first_user)
  if bucket < TASKMASTER_TEST_PERCENT:
    return "test"
  return "rl" if bucket < TASKMASTER_TEST_PERCENT + TASKMASTER_RL_PERCENT else "train"


class TaskmasterDialogs(_PreferenceBuilder, skip_registration=True):
  """Taskmaster-4 (TM-4-2024) Coffee dialogs released with PERL, as demonstrations: one example
  per agent turn (a reply or an API call), prompt = the dialog so far, chosen = that turn."""

  name = "taskmaster_dialogs"
  KIND = DEMONSTRATIONS
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Copy TM-4-2024/data/data_*.json of github.com/google-research-datasets/Taskmaster (CC BY 4.0)
  and pass that folder, or the folder above it holding data/, as the manual dir. Each file is a
  JSON array of dialogs {conversation_id, utterances: [{speaker, text, annotations: [{name,
  value, context}]}]}. Splits, by a sha256 of the first user turn (the key the reward examples'
  split uses, so a test dialog is test in both): test 10%, rl 20% (RL training prompts), train
  70% (SFT).
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    names = cls._taskmaster_files(manual_dir, "data", "data_")
    return {split: names for split in ("train", "rl", "test")}

  def _split_generators(self, dl_manager):
    manual_dir, files = self._split_files(dl_manager)

    def keep(split):
      def keep_row(source, row):
        try:  # unreadable dialogs are reported with the train split
          return taskmaster_dialog_split(taskmaster_dialog_turns(row)) == split
        except (MalformedRow, StopIteration):
          return split == "train"
      return keep_row

    return {split: self._generate_examples(split, manual_dir, names, reader=_read_json_rows,
                                           keep=keep(split))
            for split, names in files.items()}

  def _parse(self, row):
    conversation_id = _field(row, "conversation_id")
    turns = taskmaster_dialog_turns(row)
    return [dict(prompt=taskmaster_prompt(turns[:i]),
                 chosen=render_taskmaster_content(turn).strip(), rejected="", label=1.0,
                 conversation_id=conversation_id)
            for i, turn in enumerate(turns) if turn["role"] == "agent" and i > 0]


# ---------------------------------------------------------------------------------------------
# Generic JSON lines.
# ---------------------------------------------------------------------------------------------

def _row_kind(row: Any) -> str | None:
  if not isinstance(row, dict):
    return None
  pairwise, pointwise = "chosen" in row or "rejected" in row, "response" in row or "label" in row
  return None if pairwise == pointwise else PAIRWISE if pairwise else POINTWISE


class JsonlPreferences(_PreferenceBuilder, skip_registration=True):
  """Your own data: pairwise {prompt, chosen, rejected} or pointwise {prompt, response, label}."""

  name = "jsonl_preferences"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put train.jsonl (and optionally test.jsonl; .jsonl.gz also accepted) in the manual dir, one JSON
  object per line, all of one kind: pairwise {"prompt", "chosen", "rejected"} or pointwise
  {"prompt", "response", "label" (0 or 1)}. The kind is that of the first train row that has one.
  """

  @classmethod
  def manual_files(cls, manual_dir, config):
    train = _first_file(manual_dir, "train.jsonl", "train.jsonl.gz")
    if train is None:
      raise cls._missing(manual_dir, config, ["train.jsonl (or train.jsonl.gz)"])
    test = _first_file(manual_dir, "test.jsonl", "test.jsonl.gz")
    return {"train": [train], **({"test": [test]} if test else {})}

  def _split_generators(self, dl_manager):
    manual_dir, names = self._split_files(dl_manager)
    files = {split: split_names[0] for split, split_names in names.items()}
    kind = None
    try:
      for _, row, _ in _read_json_lines(os.path.join(manual_dir, files["train"]), files["train"]):
        kind = _row_kind(row)
        if kind:
          break
    except FileCut:
      pass  # _generate_examples reports the cut
    if kind is None:
      raise ValueError(f"{self.name}: no row of {os.path.join(manual_dir, files['train'])} is "
                       "pairwise {prompt, chosen, rejected} or pointwise {prompt, response, label}")
    self.info.metadata["kind"] = kind
    return {split: self._generate_examples(split, manual_dir, [name])
            for split, name in files.items()}

  def _parse(self, row):
    kind, expected = _row_kind(row), self.info.metadata["kind"]
    if kind != expected:
      found = "neither or both of chosen/rejected and response/label" if kind is None else kind
      raise MalformedRow(f"{found} row in a {expected} file")
    prompt = _field(row, "prompt")
    if kind == PAIRWISE:
      return _pairwise(prompt, _field(row, "chosen"), _field(row, "rejected"))
    return _pointwise(prompt, _field(row, "response"),
                      _binary_label(_field(row, "label", (int, float)), "label"))


# ---------------------------------------------------------------------------------------------
# The loader.
# ---------------------------------------------------------------------------------------------

BUILDERS = {cls.name: cls for cls in (AnthropicHh, TldrComparisons, Shp, Taskmaster,
                                      TaskmasterDialogs, JsonlPreferences)}
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
                       f"{_flag(cls.name, 'config')} empty")
    return None
  config = config or cls.DEFAULT_BUILDER_CONFIG_NAME
  if config not in names:
    raise ValueError(f"{cls.name} has no config {config!r}; it has {names} "
                     f"({_flag(cls.name, 'config')})")
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
  preparation of the dataset, that one is read (and said so).
  """
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
  text = f"{name}: {os.path.join(manual_dir, first['file'])} is {describe_cut(first)}"
  for cut in cuts[1:]:
    text += f"; and {cut['file']} is {describe_cut(cut)}"
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
      raise PartialFileError(f"{message}. Repair or copy the file again, or set "
                             f"{_flag(name, 'allow_partial')}=True to train on the rows read")
    print(f"[data] warning: {message}; allow_partial=True: training on the rows read, the lost "
          "rows counted as skipped", flush=True)
  source = builder.as_data_source(split=split)
  columns = {key: [] for key in _TEXT_FIELDS}
  labels = np.zeros(len(source), np.float32)
  chunk = 1024
  for start in range(0, len(source), chunk):
    indices = list(range(start, min(start + chunk, len(source))))
    for index, example in zip(indices, source.__getitems__(indices)):
      for key in _TEXT_FIELDS:
        columns[key].append(example[key].decode("utf-8"))
      labels[index] = example["label"]
  cuts = partial.get(split, [])
  skipped = list(metadata["skipped"].get(split, []))
  rows_skipped = len(skipped) + sum(cut["rows_lost"] or 0 for cut in cuts)
  skipped = [f"{cut['file']}:{cut['line']}: {describe_cut(cut)}" for cut in cuts] + skipped
  return Preferences(
      kind=metadata["kind"], prompts=columns["prompt"], chosen=columns["chosen"],
      rejected=columns["rejected"], labels=labels, sources=columns["source"],
      rows_skipped=rows_skipped, skipped=skipped, conversation_ids=columns["conversation_id"])
