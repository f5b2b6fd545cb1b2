"""Chat formatting: a dataset's dialog text as a chat model's turns (config.tokenizer.chat_template).

The datasets render dialogs as labelled text: Anthropic HH "\\n\\nHuman: ...\\n\\nAssistant: ...",
Taskmaster "User: ...\\nAgent: ...\\nAPI: [result] ...", each prompt ending with the label of the
turn to write ("Assistant:" / "Agent:"). `turns` reads that text back as (role, text) turns, and
`gemma_prompt` renders them as Gemma's chat format:

  <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{text}<end_of_turn>\\n
  ...<start_of_turn>model\\n

A response then ends with <end_of_turn>, which is the end-of-sequence token in chat mode: samples
stop at it and a reward model reads its score there. Turn markers are Gemma's control tokens
(`<start_of_turn>` 105, `<end_of_turn>` 106 in the Gemma 2/3 vocabulary): they are inserted by id,
never parsed from the text, so text that spells a marker stays text. Tool results (Taskmaster's
"API:" turns) go in user turns, keeping their label; consecutive turns of one role merge.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

TEMPLATES = ("", "gemma")
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
# A dataset's speaker label -> (chat role, whether the label stays in the turn's text).
SPEAKERS = {"Human": ("user", False), "User": ("user", False), "Assistant": ("model", False),
            "Agent": ("model", False), "API": ("user", True)}
_LABEL = re.compile(r"(?:^|\n)[ \t]*(" + "|".join(SPEAKERS) + r"):[ \t]?")


def turns(dialog: str) -> list[tuple[str, str]]:
  """(role, text) turns of a labelled dialog, roles "user" / "model"; consecutive turns of one
  role merge with a newline. Text before the first label (or with no label at all) is one user
  turn. A trailing label with no text (the prompt's "Assistant:") is dropped: it names the turn
  the model writes next."""
  found = list(_LABEL.finditer(dialog))
  pieces = []
  head = dialog[:found[0].start()] if found else dialog
  if head.strip():
    pieces.append(("user", head.strip()))
  for i, match in enumerate(found):
    end = found[i + 1].start() if i + 1 < len(found) else len(dialog)
    role, keep_label = SPEAKERS[match.group(1)]
    text = dialog[match.end():end].strip()
    if not text:
      continue
    pieces.append((role, f"{match.group(1)}: {text}" if keep_label else text))
  merged: list[tuple[str, str]] = []
  for role, text in pieces:
    if merged and merged[-1][0] == role:
      merged[-1] = (role, merged[-1][1] + "\n" + text)
    else:
      merged.append((role, text))
  return merged


def gemma_prompt(dialog: str, encode: Callable[[str], list[int]], bos_id: int,
                 start_of_turn_id: int, end_of_turn_id: int) -> list[int]:
  """BOS, every turn of `dialog` in Gemma's chat format, then an open model turn."""
  ids = [bos_id]
  for role, text in turns(dialog):
    ids += [start_of_turn_id] + encode(f"{role}\n{text}") + [end_of_turn_id] + encode("\n")
  return ids + [start_of_turn_id] + encode("model\n")


def gemma_text(turn_list: Sequence[tuple[str, str]]) -> str:
  """The same format as text (markers spelled out), for reading and for other tokenizers."""
  return "".join(f"{START_OF_TURN}{role}\n{text}{END_OF_TURN}\n"
                 for role, text in turn_list) + f"{START_OF_TURN}model\n"
