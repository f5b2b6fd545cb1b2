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
kept or skipped whole). The list, the dataset kind ("pairwise", "pointwise" or "demonstrations":
SFT examples, e.g. taskmaster_dialogs), the manual dir and the files read are saved by TFDS with
the prepared data, in `<data_dir>/<name>/[<config>/]1.0.0/metadata.json` (the builder's
`info.metadata`), so loading an already prepared dataset reports them again. A split with no usable rows stops the preparation.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import os
import textwrap
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

PREFERENCE_DATASETS = ("anthropic_hh", "tldr_comparisons", "shp", "taskmaster",
                       "taskmaster_dialogs", "jsonl_preferences")
PAIRWISE, POINTWISE, DEMONSTRATIONS = "pairwise", "pointwise", "demonstrations"
_VERSION = "1.0.0"
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "source", "conversation_id")


@dataclasses.dataclass
class Preferences:
  kind: str                 # "pairwise", "pointwise" or "demonstrations"
  prompts: list[str]
  chosen: list[str]         # for pointwise: the response
  rejected: list[str]       # for pointwise: ""
  labels: np.ndarray        # float32 [N]
  sources: list[str]        # "file:line" per row
  rows_skipped: int
  skipped: list[str]        # "file:line: reason" per skipped row
  conversation_ids: list[str] = dataclasses.field(default_factory=list)  # "" where none


# ---------------------------------------------------------------------------------------------
# Reading rows. A reader yields (source, value, error) per row: value is the parsed JSON, error
# is "" or why the row could not be read.
# ---------------------------------------------------------------------------------------------

Row = tuple[str, Any, str]


def _open_bytes(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_json_lines(path: str, name: str) -> Iterator[Row]:
  """One JSON value per line (gzipped if the name ends in .gz); blank lines are not rows."""
  line_number = 0
  with _open_bytes(path) as f:
    try:
      for line_number, raw_line in enumerate(f, start=1):
        source = f"{name}:{line_number}"
        try:
          line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
          yield source, None, f"undecodable UTF-8 text at byte {e.start}"
          continue
        if line_number == 1:
          line = line.lstrip("\ufeff")
        if not line.strip():
          continue
        try:
          yield source, json.loads(line), ""
        except json.JSONDecodeError as e:
          yield source, None, f"bad JSON: {e.msg} at column {e.colno}"
    except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
      yield f"{name}:{line_number + 1}", None, f"unreadable file from here on: {e}"


def _read_json_rows(path: str, name: str) -> Iterator[Row]:
  """A JSON array of rows (source = line where each row starts), or JSON lines."""
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

  pos = skip_space(start + 1)
  if text[pos:pos + 1] == "]":
    return
  while True:
    source = f"{name}:{line_at(pos)}"
    try:
      value, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      yield source, None, f"bad JSON: {e.msg}; the rest of the file is unreadable"
      return
    yield source, value, ""
    pos = skip_space(pos)
    if text[pos:pos + 1] == ",":
      pos = skip_space(pos + 1)
    elif text[pos:pos + 1] == "]":
      return
    else:
      yield f"{name}:{line_at(pos)}", None, "bad JSON: expected ',' or ']'; the rest is unreadable"
      return


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


def _check_example(example: dict, kind: str) -> None:
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
  elif not example["chosen"]:
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

class _PreferenceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the unified schema; subclasses say which files feed which split and parse a row."""

  VERSION = tfds.core.Version(_VERSION)
  KIND = PAIRWISE
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

  def _manual_dir(self, dl_manager) -> str:
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # TFDS' "does not exist or is empty", with the instructions
      raise FileNotFoundError(f"{self.name}: {e}") from e
    self.info.metadata["manual_dir"] = os.path.abspath(manual_dir)
    self.info.metadata.setdefault("kind", self.KIND)
    self.info.metadata.setdefault("skipped", {})
    self.info.metadata.setdefault("files", {})
    return manual_dir

  def _instructions(self) -> str:
    return textwrap.dedent(self.MANUAL_DOWNLOAD_INSTRUCTIONS).strip()

  def _require_file(self, manual_dir: str, *candidates: str) -> str:
    """The first of `candidates` (relative paths) that exists, or an error naming them all."""
    for candidate in candidates:
      if os.path.isfile(os.path.join(manual_dir, candidate)):
        return candidate
    raise FileNotFoundError(
        f"{self.name}: expected {' or '.join(candidates)} in manual dir {manual_dir}.\n"
        + self._instructions())

  def _generate_examples(self, split: str, manual_dir: str, names: list[str],
                         reader: Callable[[str, str], Iterator[Row]] = _read_json_lines,
                         keep: Callable[[str, Any], bool] | None = None):
    """Generator of one split's examples from the files `names` (relative to manual_dir).

    keep(source, value), if given, says whether a row (read or not) belongs to this split.
    """
    self.info.metadata["files"][split] = names
    skipped, usable = [], 0
    for name in names:
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
            _check_example(example, self.info.metadata["kind"])
        except MalformedRow as e:
          skipped.append(f"{source}: {e}")
          continue
        usable += len(examples)
        if isinstance(parsed, list):  # one row, several examples (a dialog's agent turns)
          for index, example in enumerate(examples):
            yield f"{source}#{index}", example
        else:
          yield source, parsed
    self.info.metadata["skipped"][split] = skipped
    if skipped:
      logging.warning("%s/%s: skipped %d malformed rows, e.g. %s", self.name, split, len(skipped),
                      skipped[0])
    if not usable:
      raise ValueError(
          f"{self.name}: split {split!r} has no usable rows in {names} under {manual_dir} "
          f"({len(skipped)} malformed rows, first: {skipped[:3]})")

  def _taskmaster_files(self, manual_dir: str, folder: str, prefix: str) -> list[str]:
    """`<prefix>*.json` in manual_dir/<folder>/ (the TM-4-2024 layout) or in manual_dir."""
    where = folder if os.path.isdir(os.path.join(manual_dir, folder)) else ""
    names = sorted(os.path.join(where, f) for f in os.listdir(os.path.join(manual_dir, where))
                   if f.startswith(prefix) and f.endswith(".json"))
    if not names:
      raise FileNotFoundError(
          f"{self.name}: expected {prefix}*.json in manual dir {manual_dir} or in its {folder}/ "
          "folder.\n" + self._instructions())
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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    subsets = _HH_SUBSETS if self.builder_config.name == "all" else (self.builder_config.name,)
    files = {split: [self._require_file(manual_dir, f"{subset}/{split}.jsonl.gz",
                                        f"{subset}/{split}.jsonl") for subset in subsets]
             for split in ("train", "test")}
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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    folder = "comparisons" if os.path.isdir(os.path.join(manual_dir, "comparisons")) else ""
    names = sorted(
        os.path.join(folder, f) if folder else f
        for f in os.listdir(os.path.join(manual_dir, folder))
        if f.startswith("batch") and f.endswith(".json") and f not in _CNNDM_FILES)
    if not names:
      raise FileNotFoundError(
          f"{self.name}: expected comparisons/batch*.json in manual dir {manual_dir}.\n"
          + self._instructions())
    return {split: self._generate_examples(split, manual_dir, names, keep=self._keep(split))
            for split in _TLDR_SPLITS}

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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    subreddits = sorted(
        d for d in os.listdir(manual_dir)
        if any(os.path.isfile(os.path.join(manual_dir, d, f"{s}.json")) for s in _SHP_SPLITS))
    if not subreddits:
      raise FileNotFoundError(
          f"{self.name}: expected <subreddit>/train.json, validation.json, test.json in manual "
          f"dir {manual_dir}.\n" + self._instructions())
    files = {split: [self._require_file(manual_dir, f"{d}/{split}.json") for d in subreddits]
             for split in _SHP_SPLITS}
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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    names = self._taskmaster_files(manual_dir, "reward", "reward_")
    return {split: self._generate_examples(split, manual_dir, names, reader=_read_json_rows,
                               keep=lambda source, row, split=split:
                               taskmaster_split(row, source) == split)
            for split in ("train", "test")}

  def _parse(self, row):
    conversation_id = _field(row, "conversation_id")
    try:
      turns = json.loads(_field(row, "context"))
      generation = json.loads(_field(row, "generation"))
    except json.JSONDecodeError as e:
      raise MalformedRow(f"context or generation is not JSON: {e.msg}")
    if not isinstance(turns, list):
      raise MalformedRow("context is not a JSON list of turns")
    if not isinstance(generation, dict) or generation.get("role") != "agent":
      raise MalformedRow("generation is not an agent turn")
    label = _binary_label(_field(row, "reward", (int, float)), "reward")
    return _pointwise(taskmaster_prompt(turns), render_taskmaster_content(generation), label,
                      conversation_id)


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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    names = self._taskmaster_files(manual_dir, "data", "data_")

    def keep(split):
      def keep_row(source, row):
        try:  # unreadable dialogs are reported with the train split
          return taskmaster_dialog_split(taskmaster_dialog_turns(row)) == split
        except (MalformedRow, StopIteration):
          return split == "train"
      return keep_row

    return {split: self._generate_examples(split, manual_dir, names, reader=_read_json_rows,
                                           keep=keep(split))
            for split in ("train", "rl", "test")}

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

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    files = {"train": self._require_file(manual_dir, "train.jsonl", "train.jsonl.gz")}
    try:
      files["test"] = self._require_file(manual_dir, "test.jsonl", "test.jsonl.gz")
    except FileNotFoundError:
      pass
    kinds = (_row_kind(row) for _, row, _ in
             _read_json_lines(os.path.join(manual_dir, files["train"]), files["train"]))
    kind = next((kind for kind in kinds if kind), None)
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


def prepared_builder(name: str, manual_dir: str, data_dir: str, config: str | None = None):
  """The builder of `name`, its array_record files prepared under data_dir if they were not."""
  if name not in BUILDERS:
    raise ValueError(f"unknown preference dataset {name!r}; known: {PREFERENCE_DATASETS}")
  data_dir = os.path.expanduser(data_dir)
  tfds.disable_progress_bar()  # our stages print their own progress lines
  builder = BUILDERS[name](data_dir=data_dir, config=config, file_format="array_record")
  builder.download_and_prepare(
      file_format="array_record",
      download_dir=os.path.join(data_dir, "downloads"),
      download_config=tfds.download.DownloadConfig(manual_dir=os.path.expanduser(manual_dir)))
  prepared_from = builder.info.metadata.get("manual_dir")
  if prepared_from and prepared_from != os.path.abspath(os.path.expanduser(manual_dir)):
    logging.warning("%s was prepared from %s, not %s; delete %s to prepare it again", name,
                    prepared_from, manual_dir, builder.data_dir)
  return builder


def load_preferences(name: str, split: str, manual_dir: str, data_dir: str,
                     config: str | None = None) -> Preferences:
  """All rows of one split, in file order, preparing the dataset first if needed."""
  builder = prepared_builder(name, manual_dir, data_dir, config)
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
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
  skipped = list(builder.info.metadata["skipped"].get(split, []))
  return Preferences(
      kind=builder.info.metadata["kind"], prompts=columns["prompt"], chosen=columns["chosen"],
      rejected=columns["rejected"], labels=labels, sources=columns["source"],
      rows_skipped=len(skipped), skipped=skipped, conversation_ids=columns["conversation_id"])
