"""What every dataset module shares: reading files into rows, checking a row, and the base
TFDS builder that writes the rows and reports the ones it skips.

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
allows, else "unknown"); `loader.load_preferences` then fails with PartialFileError unless
allow_partial=True, which counts the lost rows as skipped.

The list, the partial files, the dataset kind ("pairwise", "pointwise" or "demonstrations": SFT
examples, e.g. taskmaster_dialogs), the manual dir and the files read go into the builder's
`info.metadata`, which TFDS saves with the prepared data (see loader.py for where).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import re
import zlib
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from perl_jax import errors

PAIRWISE, POINTWISE, DEMONSTRATIONS = "pairwise", "pointwise", "demonstrations"
_VERSION = "1.1.0"
_RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Taskmaster keeps empty agent turns; files cut part-way recorded in metadata.",
}
TEXT_FIELDS = ("prompt", "chosen", "rejected", "source", "conversation_id")


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


def read_json_lines(path: str, name: str) -> Iterator[Row]:
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


def read_json_rows(path: str, name: str) -> Iterator[Row]:
  """A JSON array of rows (source = line where each row starts), or JSON lines.

  When the array stops being readable, raises FileCut counting the rows that start in the unread
  text (at least that many if the file ends before the array closes).
  """
  with open(path, "rb") as f:
    # Undecodable bytes become lone surrogates, which the UTF-8 check on each row's text catches.
    text = f.read().decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
  start = len(text) - len(text.lstrip())
  if not text[start:].startswith("["):
    yield from read_json_lines(path, name)
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
# Checking fields. A parser turns one JSON value into an example dict, or raises MalformedRow.
# ---------------------------------------------------------------------------------------------

class MalformedRow(ValueError):
  """A row that cannot become an example; the message is the reason."""


def field(row: Any, key: str, kind: type | tuple = str):
  """row[key], or MalformedRow unless row is an object holding a `kind` (bools are no numbers)."""
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


def binary_label(value: Any, key: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
    raise MalformedRow(f"field {key!r} is {value!r}, not 0 or 1")
  return float(value)


def check_example(example: dict, kind: str, empty_responses: bool = False) -> None:
  """MalformedRow unless the example's text is valid and its responses usable; empty_responses:
  a pointwise "" response is a labelled row (Taskmaster's empty agent turns)."""
  for key in TEXT_FIELDS:
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


def pairwise_example(prompt: str, chosen: str, rejected: str, conversation_id: str = "") -> dict:
  return dict(prompt=prompt, chosen=chosen.strip(), rejected=rejected.strip(), label=1.0,
              conversation_id=conversation_id)


def pointwise_example(prompt: str, response: str, label: float, conversation_id: str = "") -> dict:
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


def config_flag(name: str, key: str) -> str:
  """The command-line flag that sets `key` of the config block reading dataset `name`: the
  task's dialogs are config.data, the reward stage's data config.reward.data."""
  return f"--config.{'data' if name == 'taskmaster_dialogs' else 'reward.data'}.{key}"


def first_file(manual_dir: str, *candidates: str) -> str | None:
  return next((c for c in candidates if os.path.isfile(os.path.join(manual_dir, c))), None)


class PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
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
    text = {key: tfds.features.Text() for key in TEXT_FIELDS}
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
    fix = fix or (f"copy the published files there or point "
                  f"{config_flag(cls.name, 'manual_dir')} at them; expected: "
                  f"{' '.join(cls.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}")
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
                         reader: Callable[[str, str], Iterator[Row]] = read_json_lines,
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
              check_example(example, self.info.metadata["kind"], self.EMPTY_RESPONSES)
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

  def _parse(self, row: Any) -> dict | list[dict]:
    """One JSON value as an example dict (without source), or a list of them, or MalformedRow
    saying why not (a row's examples are kept or skipped together)."""
    raise NotImplementedError
