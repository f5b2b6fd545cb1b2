"""The Taskmaster Coffee task: the dialog builder on fixtures in the published format and on the
released files and the held-out judge (the whole pipeline on the released data runs in
tests/test_configs.py, configs/paper/taskmaster.py:small)."""
import json
import os

import numpy as np
import pytest

from configs.paper import taskmaster as taskmaster_config
from perl_jax import main
from perl_jax.data import reading
from perl_jax.data import taskmaster as taskmaster_data
from perl_jax.data.loader import load_preferences
from perl_jax.tasks import taskmaster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASED = os.path.join(ROOT, "..", "shared", "data", "taskmaster-coffee")
needs_released = pytest.mark.skipif(not os.path.isdir(RELEASED),
                                     reason=f"released Taskmaster files absent ({RELEASED})")


def utterance(speaker, text, *calls):
  """calls: (name, request JSON text or None, response JSON text)."""
  annotations = []
  for i, (name, request, response) in enumerate(calls):
    annotations.append({"name": "api_call", "value": name, "context": f"api_call_{i}"})
    if request is not None:
      annotations.append({"name": "request", "value": request, "context": f"api_call_{i}"})
    annotations += [{"name": "api_response", "value": name, "context": f"api_response_{i}"},
                    {"name": "response", "value": response, "context": f"api_response_{i}"}]
  return {"index": 0, "speaker": speaker, "text": text, "segments": [],
          "annotations": annotations}


def dialog(conversation_id, *utterances):
  return {"conversation_id": conversation_id, "vertical": "Coffee", "scenario": "s",
          "instructions": None, "utterances": list(utterances)}


def opening_in(split):
  for i in range(1000):
    text = f"one latte number {i}"
    if taskmaster_data.taskmaster_dialog_split([{"role": "user", "text": text}]) == split:
      return text
  raise AssertionError(split)


def test_dialogs_become_demonstrations_of_each_agent_turn(tmp_path):
  to_train, to_rl, to_test = opening_in("train"), opening_in("rl"), opening_in("test")
  good = dialog("dlg-1",
                utterance("user", to_train,
                          ("get_menu_items", '{"query": "latte"}', '{"menu_items": []}'),
                          ("show_menu", None, '{"ok": true}')),
                utterance("assistant", "Anything else?"))
  rows = [good,
          dialog("dlg-2", utterance("user", to_train, ("add_order_item", '{"id": 1}', "{bad")),
                 utterance("assistant", "Done.")),
          dialog("dlg-3", utterance("waiter", to_train)),
          dialog("dlg-4", utterance("user", to_test), utterance("assistant", "Coming up.")),
          dialog("dlg-5", utterance("user", to_rl), utterance("assistant", "Hot or iced?"))]
  os.makedirs(tmp_path / "tm/data")
  text = json.dumps(rows, indent=4)
  (tmp_path / "tm/data/data_00.json").write_text(text)
  # A row's source is the line where its object opens: the line above its conversation_id.
  line_of = {f"dlg-{i}": text[:text.index(f'"dlg-{i}"')].count("\n") for i in range(1, 6)}

  train = load_preferences("taskmaster_dialogs", "train", tmp_path / "tm", tmp_path / "tfds")
  assert train.kind == "demonstrations"
  call = 'Agent: [call] get_menu_items {"query": "latte"}'
  result = 'API: [result] get_menu_items {"menu_items": []}'
  show = "Agent: [call] show_menu {}"  # a published call without a request: no arguments
  assert train.prompts == [f"User: {to_train}\nAgent:",
                           f"User: {to_train}\n{call}\n{result}\nAgent:",
                           f"User: {to_train}\n{call}\n{result}\n{show}\n"
                           f"API: [result] show_menu {{\"ok\": true}}\nAgent:"]
  assert train.chosen == ['[call] get_menu_items {"query": "latte"}', "[call] show_menu {}",
                          "Anything else?"]
  assert train.conversation_ids == ["dlg-1"] * 3
  assert train.sources == ["data/data_00.json:2"] * 3 and line_of["dlg-1"] == 2
  assert [s.split(": ", 1)[0] for s in train.skipped] == [
      f"data/data_00.json:{line_of['dlg-2']}", f"data/data_00.json:{line_of['dlg-3']}"]
  assert "response of 'api_response_0' is not JSON" in train.skipped[0]
  assert "speaker is not 'user' or 'assistant'" in train.skipped[1]
  test = load_preferences("taskmaster_dialogs", "test", tmp_path / "tm", tmp_path / "tfds")
  assert (test.prompts, test.chosen) == ([f"User: {to_test}\nAgent:"], ["Coming up."])
  rl = load_preferences("taskmaster_dialogs", "rl", tmp_path / "tm", tmp_path / "tfds")
  assert (rl.chosen, rl.sources) == (["Hot or iced?"], [f"data/data_00.json:{line_of['dlg-5']}"])


def test_dialogs_file_cut_part_way_fails_the_task_unless_data_allow_partial(tmp_path):
  rows = [dialog(f"dlg-{i}", utterance("user", f"one latte number {i}"),
                 utterance("assistant", f"Order {i} coming up.")) for i in range(40)]
  text = json.dumps(rows, indent=4)
  cut_at = text.index('"dlg-25"')
  os.makedirs(tmp_path / "tm/data")
  (tmp_path / "tm/data/data_00.json").write_text(text[:cut_at] + "@@ " + text[cut_at:])
  config = taskmaster_config.get_config()
  config.data.manual_dir = str(tmp_path / "tm")
  with pytest.raises(reading.PartialFileError,
                     match=r"data/data_00.json is unreadable from line \d+ \(15 rows lost\).*"
                           r"--config.data.allow_partial=True"):
    taskmaster.demonstrations(config, str(tmp_path), "train")
  config.data.allow_partial = True
  splits = {split: taskmaster.demonstrations(config, str(tmp_path), split)
            for split in ("train", "rl", "test")}
  assert sum(len(d.prompts) for d in splits.values()) == 25  # one demonstration per dialog
  assert splits["train"].rows_skipped == 15  # unreadable dialogs count with the train split


@needs_released
def test_released_dialogs_split_like_the_reward_examples(tmp_path):
  published = [d for f in sorted(os.listdir(f"{RELEASED}/data"))
               for d in json.load(open(f"{RELEASED}/data/{f}"))]
  assert len(published) == 3710  # the upstream README says 6,500
  splits = {s: load_preferences("taskmaster_dialogs", s, RELEASED, tmp_path)
            for s in ("train", "rl", "test")}
  skipped = [line for s in splits.values() for line in s.skipped]
  assert len(skipped) == 20 and all("is not JSON" in line for line in skipped)
  dialogs = {s: set(d.conversation_ids) for s, d in splits.items()}
  assert sum(map(len, dialogs.values())) == len(published) - len(skipped)
  assert not (dialogs["train"] & dialogs["test"] or dialogs["rl"] & dialogs["test"])
  assert 0.08 < len(dialogs["test"]) / len(published) < 0.12
  # A dialog opening the reward examples hold out is held out here too.
  first_user = lambda p: p.split("\n", 1)[0]
  reward_test = load_preferences("taskmaster", "test", RELEASED, tmp_path)
  reward_test_openings = {next((line for line in p.split("\n") if line.startswith("User: ")),
                               None) for p in reward_test.prompts} - {None}
  train_openings = {first_user(p) for p in splits["train"].prompts}
  assert not train_openings & reward_test_openings
  assert all(taskmaster.is_well_formed(c) for c in splits["train"].chosen)


def test_judge_compares_with_the_published_turn():
  latte = '[call] get_menu_items {"query": "latte"}'
  references = [latte, latte, "Anything else?", '[call] finish_order {"order_id": "1"}']
  samples = ['[call] get_menu_items {"query":"latte"}', '[call] get_menu_items {"query": "mocha"}',
             "Would you like a pastry?", '[call] finish_order {"order_id": ']
  judged = taskmaster.judge(samples, references)
  np.testing.assert_array_equal(judged["act_match"], [1, 1, 1, 0])
  np.testing.assert_array_equal(judged["call_exact_match"], [1, 0, np.nan, 0])
  np.testing.assert_array_equal(judged["well_formed"], [1, 1, 1, 0])
  assert taskmaster.parse_turn("[call] show_menu {}") == ("call", "show_menu", {})
  assert taskmaster.parse_turn("") == ("malformed", None, None)


def test_taskmaster_needs_the_published_files(tmp_path):
  config = taskmaster_config.get_config()
  config.stages = ("sft",)
  with pytest.raises(ValueError, match="data.manual_dir"):
    main.run(config, str(tmp_path))
