"""Taskmaster-4 (TM-4-2024) Coffee, released with PERL (arXiv 2403.10704): the builder of its
pointwise reward examples, the builder of its dialogs as demonstrations (SFT examples and RL
prompts), and the rendering of turns and the split by dialog that the two share."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

from perl_jax.data import reading

TASKMASTER_TEST_PERCENT = 10  # dialog buckets [0, 10): test, in the reward examples and the dialogs


def render_taskmaster_turn(turn: Any) -> str:
  """One turn as a line: "User: ...", "Agent: ...", "Agent: [call] name {args}",
  "API: [result] name {response}"."""
  if not isinstance(turn, dict):
    raise reading.MalformedRow(f"a turn is a JSON {type(turn).__name__}, not an object")
  speaker = {"user": "User", "agent": "Agent", "api": "API"}.get(turn.get("role"))
  if speaker is None:
    raise reading.MalformedRow(f"a turn has role {turn.get('role')!r}, not user, agent or api")
  return f"{speaker}: {render_taskmaster_content(turn)}"


def render_taskmaster_content(turn: dict) -> str:
  """What a turn says: its text, or its API call or result as `[kind] name {json}`."""
  if isinstance(turn.get("text"), str):
    return turn["text"]
  for key, tag in (("api", "call"), ("response", "result")):
    if isinstance(turn.get(key), dict) and turn[key]:
      return "; ".join(f"[{tag}] {name} {json.dumps(value, ensure_ascii=False)}"
                       for name, value in turn[key].items())
  raise reading.MalformedRow(f"a {turn.get('role')} turn has no text, api or response")


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


def _published_files(cls, manual_dir: str, folder: str, prefix: str) -> list[str]:
  """`<prefix>*.json` in manual_dir/<folder>/ (the TM-4-2024 layout) or in manual_dir; cls's
  MissingManualFiles if there are none."""
  where = folder if os.path.isdir(os.path.join(manual_dir, folder)) else ""
  names = sorted(os.path.join(where, f) for f in os.listdir(os.path.join(manual_dir, where))
                 if f.startswith(prefix) and f.endswith(".json"))
  if not names:
    raise cls._missing(manual_dir, None, [f"{folder}/{prefix}*.json (or {prefix}*.json)"])
  return names


def _splits_by_dialog(builder, dl_manager, split_of: Callable[[str, Any], str]) -> dict:
  """The builder's split generators over the published JSON arrays, each split keeping the rows
  (and the files cut part-way) that split_of(source, row or None) assigns to it."""
  manual_dir, files = builder._split_files(dl_manager)

  def keep(split):
    return lambda source, row: split_of(source, row) == split

  return {split: builder._generate_examples(split, manual_dir, names,
                                            reader=reading.read_json_rows, keep=keep(split))
          for split, names in files.items()}


class Taskmaster(reading.PreferenceBuilder, skip_registration=True):
  """Taskmaster-4 (TM-4-2024) Coffee reward examples released with PERL (arXiv 2403.10704)."""

  name = "taskmaster"
  KIND = reading.POINTWISE
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
    names = _published_files(cls, manual_dir, "reward", "reward_")
    return {"train": names, "test": names}

  def _split_generators(self, dl_manager):
    # Unreadable rows are reported with the train split.
    return _splits_by_dialog(self, dl_manager, lambda source, row: (
        "train" if row is None else taskmaster_split(row, source)))

  def _parse(self, row):
    conversation_id = reading.field(row, "conversation_id")
    generation_text = reading.field(row, "generation")
    try:
      turns = json.loads(reading.field(row, "context"))
      generation = json.loads(generation_text) if generation_text.strip() else {"role": "agent"}
    except json.JSONDecodeError as e:
      raise reading.MalformedRow(f"context or generation is not JSON: {e.msg}")
    if not isinstance(turns, list):
      raise reading.MalformedRow("context is not a JSON list of turns")
    if generation == {}:
      generation = {"role": "agent"}
    if not isinstance(generation, dict) or generation.get("role") != "agent":
      raise reading.MalformedRow("generation is not an agent turn")
    label = reading.binary_label(reading.field(row, "reward", (int, float)), "reward")
    # An empty agent turn ("", "{}", no text, blank text) is a labelled response: "".
    empty = not any(generation.get(key) for key in ("text", "api", "response"))
    response = "" if empty else render_taskmaster_content(generation)
    return reading.pointwise_example(taskmaster_prompt(turns), response, label, conversation_id)


# The Taskmaster-4 Coffee dialogs: demonstrations (context, next agent turn) for SFT and RL prompts.
TASKMASTER_RL_PERCENT = 20  # dialog buckets [10, 30): RL training prompts; [30, 100): SFT


def taskmaster_dialog_turns(dialog: Any) -> list[dict]:
  """A published dialog as turns in the reward examples' format.

  Each utterance becomes a user or agent text turn; the API calls annotated on it follow it, in
  order: {"role": "agent", "api": {name: request}} then {"role": "api", "response": {name:
  response}}, as the reward examples' contexts write them.
  """
  utterances = reading.field(dialog, "utterances", list)
  turns = []
  for position, utterance in enumerate(utterances):
    role = {"user": "user", "assistant": "agent"}.get(
        utterance.get("speaker") if isinstance(utterance, dict) else None)
    if role is None:
      raise reading.MalformedRow(f"utterance {position}: speaker is not 'user' or 'assistant'")
    turns.append({"role": role, "text": reading.field(utterance, "text")})
    groups: dict[str, dict] = {}  # annotation context ("api_call_0") -> its parts, in order
    for annotation in utterance.get("annotations") or []:
      name, value, context = (reading.field(annotation, key)
                              for key in ("name", "value", "context"))
      groups.setdefault(context, {})[name] = value
    for context, parts in groups.items():
      kind, payload = (("api_call", "request") if "api_call" in parts
                       else ("api_response", "response"))
      if kind == "api_call":
        parts.setdefault("request", "{}")  # published calls without arguments (show_menu)
      if kind not in parts or payload not in parts:
        raise reading.MalformedRow(f"utterance {position}: annotation {context!r} lacks "
                                   f"{kind!r} or {payload!r}")
      try:
        value = json.loads(parts[payload])
      except json.JSONDecodeError as e:
        raise reading.MalformedRow(
            f"utterance {position}: {payload} of {context!r} is not JSON: {e.msg}")
      turns.append({"role": "agent", "api": {parts[kind]: value}} if kind == "api_call"
                   else {"role": "api", "response": {parts[kind]: value}})
  if not any(turn["role"] == "user" for turn in turns):
    raise reading.MalformedRow("a dialog without a user turn")
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


class TaskmasterDialogs(reading.PreferenceBuilder, skip_registration=True):
  """Taskmaster-4 (TM-4-2024) Coffee dialogs released with PERL, as demonstrations: one example
  per agent turn (a reply or an API call), prompt = the dialog so far, chosen = that turn."""

  name = "taskmaster_dialogs"
  KIND = reading.DEMONSTRATIONS
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
    names = _published_files(cls, manual_dir, "data", "data_")
    return {split: names for split in ("train", "rl", "test")}

  def _split_generators(self, dl_manager):
    def split_of(source, row):
      try:  # unreadable dialogs are reported with the train split
        return taskmaster_dialog_split(taskmaster_dialog_turns(row))
      except (reading.MalformedRow, StopIteration):
        return "train"
    return _splits_by_dialog(self, dl_manager, split_of)

  def _parse(self, row):
    conversation_id = reading.field(row, "conversation_id")
    turns = taskmaster_dialog_turns(row)
    return [dict(prompt=taskmaster_prompt(turns[:i]),
                 chosen=render_taskmaster_content(turn).strip(), rejected="", label=1.0,
                 conversation_id=conversation_id)
            for i, turn in enumerate(turns) if turn["role"] == "agent" and i > 0]
