"""The preference builders on tiny fixtures in each published format, and on the real Taskmaster
reward files when they are present."""
import collections
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from perl_jax.data import anthropic_hh
from perl_jax.data import loader
from perl_jax.data import reading
from perl_jax.data import taskmaster
from perl_jax.data.loader import load_preferences

TASKMASTER_REWARD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     "..", "shared", "data", "taskmaster-coffee", "reward")


def write_lines(path, rows, gz=False):
  """JSON lines; a bytes row is written as is (for malformed lines)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n"
                  for row in rows)
  with (gzip.open if gz else open)(path, "wb") as f:
    f.write(data)


def hh_row(prefix, chosen, rejected):
  return {"chosen": prefix + chosen, "rejected": prefix + rejected}


# ------------------------------------------------------------------------------- Anthropic HH

HH_DIALOG = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?"


def write_hh(root, subsets=("helpful-base",)):
  for subset in subsets:
    write_lines(f"{root}/{subset}/train.jsonl.gz", [
        hh_row(HH_DIALOG, "\n\nAssistant: It is 4.", "\n\nAssistant: It is 5."),
        hh_row("\n\nHuman: Name a colour.", "\n\nAssistant: Red", "\n\nAssistant:  Blue "),
        hh_row("\n\nHuman: Same?", "\n\nAssistant: Yes.", "\n\nAssistant: Yes."),
        b'{"chosen": "\\n\\nHuman: broken',
        {"chosen": "\n\nHuman: Where is the rejected one?\n\nAssistant: Here."},
        {"chosen": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant: D",
         "rejected": "\n\nHuman: A\n\nAssistant: X\n\nHuman: C\n\nAssistant: D"},
        hh_row("\n\nHuman: Say nothing.", "\n\nAssistant: ok", "\n\nAssistant:   "),
    ], gz=True)
    write_lines(f"{root}/{subset}/test.jsonl.gz", [
        {"chosen": 7, "rejected": "\n\nHuman: x\n\nAssistant: y"},
        hh_row("\n\nHuman: Test prompt", "\n\nAssistant: Good answer", "\n\nAssistant: Bad answer"),
    ], gz=True)


def test_anthropic_hh_splits_the_shared_prompt_and_reports_malformed_rows(tmp_path):
  write_hh(tmp_path / "hh")
  train = load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds",
                           config="helpful-base")
  assert train.kind == "pairwise"
  assert train.prompts == [HH_DIALOG + "\n\nAssistant:", "\n\nHuman: Name a colour.\n\nAssistant:"]
  assert train.chosen == ["It is 4.", "Red"]
  assert train.rejected == ["It is 5.", "Blue"]
  np.testing.assert_array_equal(train.labels, np.ones(2, np.float32))
  assert train.labels.dtype == np.float32
  assert train.sources == ["helpful-base/train.jsonl.gz:1", "helpful-base/train.jsonl.gz:2"]
  assert train.rows_skipped == 5
  reasons = dict(line.split(": ", 1) for line in train.skipped)
  assert reasons.keys() == {f"helpful-base/train.jsonl.gz:{n}" for n in (3, 4, 5, 6, 7)}
  assert "identical" in reasons["helpful-base/train.jsonl.gz:3"]
  assert "bad JSON" in reasons["helpful-base/train.jsonl.gz:4"]
  assert "missing field 'rejected'" in reasons["helpful-base/train.jsonl.gz:5"]
  assert "before the final assistant turn" in reasons["helpful-base/train.jsonl.gz:6"]
  assert "empty rejected response" in reasons["helpful-base/train.jsonl.gz:7"]

  test = load_preferences("anthropic_hh", "test", tmp_path / "hh", tmp_path / "tfds",
                          config="helpful-base")
  assert (test.prompts, test.chosen, test.rejected) == (
      ["\n\nHuman: Test prompt\n\nAssistant:"], ["Good answer"], ["Bad answer"])
  assert test.skipped == ["helpful-base/test.jsonl.gz:1: field 'chosen' is int, not a string"]


def test_anthropic_hh_report_survives_a_reload_without_the_manual_dir(tmp_path):
  write_hh(tmp_path / "hh")
  first = load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds",
                           config="helpful-base")
  shutil.rmtree(tmp_path / "hh")
  again = load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds",
                           config="helpful-base")
  for field in ("kind", "prompts", "chosen", "rejected", "sources", "rows_skipped", "skipped"):
    assert getattr(again, field) == getattr(first, field)
  np.testing.assert_array_equal(again.labels, first.labels)
  prepared, = (tmp_path / "tfds").glob("anthropic_hh-*/anthropic_hh/helpful-base/*/metadata.json")
  metadata = json.loads(prepared.read_text())
  assert metadata["skipped"]["train"] == first.skipped
  assert metadata["kind"] == "pairwise"


def test_anthropic_hh_all_config_reads_every_subset(tmp_path):
  write_hh(tmp_path / "hh", subsets=anthropic_hh.SUBSETS)
  train = load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds",
                           config="all")
  assert len(train.prompts) == 2 * 4 and train.rows_skipped == 5 * 4
  assert train.sources[0] == "harmless-base/train.jsonl.gz:1"
  assert train.sources[-1] == "helpful-rejection-sampled/train.jsonl.gz:2"


def test_anthropic_hh_missing_subset_names_the_path_and_the_subset_present(tmp_path):
  write_hh(tmp_path / "hh", subsets=("helpful-base",))
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/hh lacks harmless-base/.*"
                     "--config.reward.data.config=helpful-base"):
    load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds", config="all")


def test_a_split_without_usable_rows_is_an_error(tmp_path):
  write_hh(tmp_path / "hh")
  write_lines(f"{tmp_path}/hh/helpful-base/test.jsonl.gz",
              [hh_row("\n\nHuman: x", "\n\nAssistant: same", "\n\nAssistant: same")], gz=True)
  with pytest.raises(ValueError, match="'test' has no usable rows.*helpful-base/test.jsonl.gz"):
    load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds",
                     config="helpful-base")


def test_missing_manual_dir_is_a_clear_error(tmp_path):
  for name in loader.PREFERENCE_DATASETS:
    with pytest.raises(FileNotFoundError, match=f"{name}.*{tmp_path}/nowhere"):
      load_preferences(name, "train", tmp_path / "nowhere", tmp_path / "tfds")


# ------------------------------------------------------------------------------ TL;DR

def tldr_row(split, choice, texts, post="My cat ignores me.", post_id="t3_a"):
  return {"info": {"id": post_id, "post": post, "title": "Cat trouble", "subreddit": "cats",
                   "site": None},
          "summaries": [{"text": text, "policy": f"policy{i}", "note": None}
                        for i, text in enumerate(texts)],
          "choice": choice, "worker": "w1", "batch": "batch3", "split": split,
          "extra": {"confidence": 7}}


def test_tldr_comparisons(tmp_path):
  root = tmp_path / "sff"
  write_lines(f"{root}/comparisons/batch3.json", [
      tldr_row("train", 1, [" cat is aloof", " my cat ignores me and I am sad"]),
      tldr_row("valid1", 0, [" first", " second"], post_id="t3_b"),
      tldr_row("train", 2, [" a", " b"]),
      tldr_row("train", 0, [" same", " same"]),
      tldr_row("valid2", 1, [" x", " y"], post_id="t3_c"),
  ])
  write_lines(f"{root}/comparisons/batch4.json", [
      tldr_row("train", 0, [" from batch four", " worse"], post="Second post."),
      {**tldr_row("train", 0, [" a", " b"]),
       "info": {"id": "t3_z", "title": "t", "subreddit": "s"}},
  ])
  write_lines(f"{root}/comparisons/batch0_cnndm.json", [b"not read at all"])

  train = load_preferences("tldr_comparisons", "train", root, tmp_path / "tfds")
  prompt = "SUBREDDIT: r/cats\nTITLE: Cat trouble\nPOST: My cat ignores me.\nTL;DR:"
  assert train.prompts == [prompt, prompt.replace("My cat ignores me.", "Second post.")]
  assert train.chosen == ["my cat ignores me and I am sad", "from batch four"]
  assert train.rejected == ["cat is aloof", "worse"]
  assert train.conversation_ids == ["t3_a", "t3_a"]
  assert train.sources == ["comparisons/batch3.json:1", "comparisons/batch4.json:1"]
  assert train.skipped == [
      "comparisons/batch3.json:3: field 'choice' is 2, not 0 or 1",
      "comparisons/batch3.json:4: identical chosen and rejected responses",
      "comparisons/batch4.json:2: missing field 'post'",
  ]
  validation = load_preferences("tldr_comparisons", "validation", root, tmp_path / "tfds")
  assert validation.chosen == ["first", "y"] and validation.rejected == ["second", "x"]
  assert validation.sources == ["comparisons/batch3.json:2", "comparisons/batch3.json:5"]
  assert validation.rows_skipped == 0


# ------------------------------------------------------------------------------ SHP

def shp_row(post_id, label, ref_a, ref_b, history="Why is the sky blue?"):
  return {"post_id": post_id, "domain": "askscience_train", "upvote_ratio": 0.98,
          "history": history, "c_root_id_A": "ca", "c_root_id_B": "cb",
          "created_at_utc_A": 1, "created_at_utc_B": 2, "score_A": 10, "score_B": 3,
          "human_ref_A": ref_a, "human_ref_B": ref_b, "labels": label,
          "seconds_difference": 1.0, "score_ratio": 3.3}


def test_shp(tmp_path):
  root = tmp_path / "SHP"
  write_lines(f"{root}/askscience/train.json", [
      shp_row("p1", 1, "Rayleigh scattering.", "Because."),
      shp_row("p2", 0, "No idea.", "Shorter wavelengths scatter more."),
      {k: v for k, v in shp_row("p3", 1, "a", "b").items() if k != "human_ref_B"},
      shp_row("p4", 2, "a", "b"),
  ])
  write_lines(f"{root}/askscience/validation.json", [shp_row("p5", 1, "val a", "val b")])
  write_lines(f"{root}/askscience/test.json", [shp_row("p6", 0, "test a", "test b")])
  write_lines(f"{root}/askhr/train.json", [shp_row("p7", 1, "hr a", "hr b", history="Raise?")])
  write_lines(f"{root}/askhr/validation.json", [shp_row("p8", 0, "", "b")])
  write_lines(f"{root}/askhr/test.json", [b"\xff\xfe not utf-8"])

  train = load_preferences("shp", "train", root, tmp_path / "tfds")
  assert train.prompts == ["Raise?", "Why is the sky blue?", "Why is the sky blue?"]
  assert train.chosen == ["hr a", "Rayleigh scattering.", "Shorter wavelengths scatter more."]
  assert train.rejected == ["hr b", "Because.", "No idea."]
  assert train.conversation_ids == ["p7", "p1", "p2"]
  assert train.skipped == ["askscience/train.json:3: missing field 'human_ref_B'",
                           "askscience/train.json:4: field 'labels' is 2, not 0 or 1"]
  validation = load_preferences("shp", "validation", root, tmp_path / "tfds")
  assert validation.chosen == ["val a"]
  assert validation.skipped == ["askhr/validation.json:1: empty rejected response"]
  test = load_preferences("shp", "test", root, tmp_path / "tfds")
  assert (test.chosen, test.rejected) == (["test b"], ["test a"])
  assert test.skipped == ["askhr/test.json:1: undecodable UTF-8 text at byte 0"]


# ------------------------------------------------------------------------------ Taskmaster

GREETING = {"role": "agent", "text": "Welcome to the Coffee Bar. What can I get for you?"}


def taskmaster_row(conversation_id, user_text, generation, reward, extra_turns=()):
  context = [GREETING, {"role": "user", "text": user_text}, *extra_turns]
  return {"conversation_id": conversation_id, "context": json.dumps(context),
          "generation": json.dumps(generation), "reward": reward}


def user_text_in(split):
  """An opening user turn that the dialog hash sends to `split`."""
  for i in range(1000):
    text = f"can i get coffee number {i}"
    if taskmaster.taskmaster_split(taskmaster_row("x", text, {}, 1.0), "f:1") == split:
      return text
  raise AssertionError(split)


def test_taskmaster_renders_turns_and_splits_by_dialog(tmp_path):
  to_train, to_test = user_text_in("train"), user_text_in("test")
  call = {"role": "agent", "api": {"get_menu_items": {"query": "espresso"}}}
  result = {"role": "api", "response": {"get_menu_items": {"items": [{"name": "Espresso"}]}}}
  rows = [
      taskmaster_row("dlg-1", to_train, call, 1.0),
      taskmaster_row("dlg-2", to_train, {"role": "agent", "text": "Single or double?"}, 0.0,
                     extra_turns=[call, result]),
      taskmaster_row("dlg-3", to_train, {"role": "agent", "text": "ok"}, 0.5),
      {**taskmaster_row("dlg-4", to_test, call, 1.0), "generation": "{not json"},
      taskmaster_row("dlg-5", to_test, {"role": "agent", "text": "Coming up."}, 1),
  ]
  os.makedirs(tmp_path / "tm/reward")
  # Published layout: a pretty-printed JSON array; row k starts on line 2 + 6k.
  (tmp_path / "tm/reward/reward_00.json").write_text(json.dumps(rows, indent=4))

  train = load_preferences("taskmaster", "train", tmp_path / "tm", tmp_path / "tfds")
  assert train.kind == "pointwise"
  opening = f"Agent: {GREETING['text']}\nUser: {to_train}"
  assert train.prompts == [
      f"{opening}\nAgent:",
      f"{opening}\nAgent: [call] get_menu_items {{\"query\": \"espresso\"}}\n"
      f"API: [result] get_menu_items {{\"items\": [{{\"name\": \"Espresso\"}}]}}\nAgent:"]
  assert train.chosen == ['[call] get_menu_items {"query": "espresso"}', "Single or double?"]
  assert train.rejected == ["", ""]
  np.testing.assert_array_equal(train.labels, np.array([1.0, 0.0], np.float32))
  assert train.conversation_ids == ["dlg-1", "dlg-2"]
  assert train.sources == ["reward/reward_00.json:2", "reward/reward_00.json:8"]
  assert train.skipped == ["reward/reward_00.json:14: field 'reward' is 0.5, not 0 or 1"]

  test = load_preferences("taskmaster", "test", tmp_path / "tm", tmp_path / "tfds")
  assert test.chosen == ["Coming up."] and test.labels.tolist() == [1.0]
  assert test.sources == ["reward/reward_00.json:26"]
  assert len(test.skipped) == 1
  assert test.skipped[0].startswith("reward/reward_00.json:20: context or generation is not JSON")


@pytest.mark.skipif(not os.path.isdir(TASKMASTER_REWARD_DIR),
                    reason=f"real Taskmaster reward files absent ({TASKMASTER_REWARD_DIR})")
def test_taskmaster_real_reward_files(tmp_path):
  files = sorted(f for f in os.listdir(TASKMASTER_REWARD_DIR) if f.startswith("reward_"))
  published = [row for f in files for row in json.load(open(f"{TASKMASTER_REWARD_DIR}/{f}"))]
  assert len(published) == 3228
  splits = {split: load_preferences("taskmaster", split, TASKMASTER_REWARD_DIR, tmp_path)
            for split in ("train", "test")}
  assert sum(len(s.prompts) + s.rows_skipped for s in splits.values()) == len(published)
  sources = [source for s in splits.values() for source in s.sources]
  assert len(set(sources)) == len(sources)
  ids = {split: set(s.conversation_ids) for split, s in splits.items()}
  assert not ids["train"] & ids["test"]
  openings = {split: {next((line for line in p.split("\n") if line.startswith("User: ")), None)
                      for p in s.prompts} - {None} for split, s in splits.items()}
  assert not openings["train"] & openings["test"]
  for split, s in splits.items():
    positives = int(s.labels.sum())
    print(f"taskmaster {split}: {len(s.prompts)} rows ({positives} labelled 1, "
          f"{len(s.prompts) - positives} labelled 0), {s.rows_skipped} skipped "
          f"{collections.Counter(r.split(': ', 1)[1] for r in s.skipped).most_common(3)}")
  assert 0.05 < len(splits["test"].prompts) / len(published) < 0.2
  assert {s.kind for s in splits.values()} == {"pointwise"}


# ------------------------------------------------------------------------------ JSON lines

def test_jsonl_pairwise(tmp_path):
  write_lines(f"{tmp_path}/mine/train.jsonl", [
      {"prompt": "Q1", "chosen": " good ", "rejected": "bad"},
      {"prompt": "Q2", "response": "r", "label": 1},
      {"prompt": "Q3", "chosen": "good", "rejected": None},
      b'{"prompt": "Q4", "chosen": "\\ud800", "rejected": "x"}',
      b'{"prompt": "Q5", "chosen": "caf\xe9", "rejected": "x"}',
      {"prompt": "Q6", "chosen": "fine", "rejected": "worse"},
  ])
  train = load_preferences("jsonl_preferences", "train", tmp_path / "mine", tmp_path / "tfds")
  assert train.kind == "pairwise"
  assert (train.prompts, train.chosen, train.rejected) == (
      ["Q1", "Q6"], ["good", "fine"], ["bad", "worse"])
  assert train.sources == ["train.jsonl:1", "train.jsonl:6"]
  assert train.skipped == [
      "train.jsonl:2: pointwise row in a pairwise file",
      "train.jsonl:3: field 'rejected' is NoneType, not a string",
      "train.jsonl:4: chosen is not valid UTF-8 text (undecodable bytes or lone surrogate)",
      "train.jsonl:5: undecodable UTF-8 text at byte 31",  # the \xe9 after 'caf'
  ]
  with pytest.raises(ValueError, match=r"no split 'test'.*\['train'\]"):
    load_preferences("jsonl_preferences", "test", tmp_path / "mine", tmp_path / "tfds")


def test_jsonl_pointwise_gzipped_with_test_split(tmp_path):
  write_lines(f"{tmp_path}/mine/train.jsonl.gz", [
      {"prompt": "Q1", "response": "yes", "label": 1},
      {"prompt": "Q2", "response": "no", "label": 0.0},
      {"prompt": "Q3", "response": "maybe", "label": 2},
      {"prompt": "Q4", "response": "", "label": 1},
      {"prompt": "Q5", "response": "true?", "label": True},
  ], gz=True)
  write_lines(f"{tmp_path}/mine/test.jsonl.gz", [{"prompt": "T", "response": "t", "label": 0}],
              gz=True)
  train = load_preferences("jsonl_preferences", "train", tmp_path / "mine", tmp_path / "tfds")
  assert train.kind == "pointwise"
  assert (train.prompts, train.chosen, train.rejected) == (["Q1", "Q2"], ["yes", "no"], ["", ""])
  assert train.labels.tolist() == [1.0, 0.0]
  assert train.skipped == ["train.jsonl.gz:3: field 'label' is 2, not 0 or 1",
                           "train.jsonl.gz:4: empty response",
                           "train.jsonl.gz:5: field 'label' is bool, not int or float"]
  test = load_preferences("jsonl_preferences", "test", tmp_path / "mine", tmp_path / "tfds")
  assert (test.prompts, test.labels.tolist(), test.sources) == (["T"], [0.0], ["test.jsonl.gz:1"])


def test_jsonl_test_split_of_the_other_kind_is_an_error(tmp_path):
  write_lines(f"{tmp_path}/mine/train.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
  write_lines(f"{tmp_path}/mine/test.jsonl", [{"prompt": "Q", "response": "a", "label": 1}])
  with pytest.raises(ValueError, match="'test' has no usable rows.*test.jsonl"):
    load_preferences("jsonl_preferences", "train", tmp_path / "mine", tmp_path / "tfds")


# ------------------------------------------------ Files cut part-way, fingerprints, manual files

def write_taskmaster_rewards(root, n_rows, generation=None):
  """n_rows reward rows (published layout: a pretty-printed JSON array); returns the text."""
  rows = [taskmaster_row(f"dlg-{i}", f"can i get coffee number {i}",
                         generation or {"role": "agent", "text": f"Coming up: order {i}."},
                         float(i % 2)) for i in range(n_rows)]
  os.makedirs(root / "reward", exist_ok=True)
  text = json.dumps(rows, indent=4)
  (root / "reward" / "reward_00.json").write_text(text)
  return text


def corrupt_row(text, row):
  """The text with stray bytes inside row `row`'s object: the array is unreadable from there."""
  at = [i for i in range(len(text)) if text.startswith('"conversation_id"', i)][row]
  return text[:at] + "@@ " + text[at:], text[:at].count("\n")  # and the row's opening line


def test_taskmaster_reward_file_corrupt_midway_fails_naming_file_line_and_rows_lost(tmp_path):
  text, opening_line = corrupt_row(write_taskmaster_rewards(tmp_path / "tm", 72), row=30)
  (tmp_path / "tm/reward/reward_00.json").write_text(text)
  with pytest.raises(reading.PartialFileError) as error:
    load_preferences("taskmaster", "train", tmp_path / "tm", tmp_path / "tfds")
  message = str(error.value)
  assert "\n" not in message
  assert f"{tmp_path}/tm/reward/reward_00.json is unreadable from line {opening_line} " in message
  assert "(42 rows lost)" in message  # rows 30..71
  assert "--config.reward.data.allow_partial=True" in message
  # The cached preparation raises again: the cut is in the builder's metadata.
  with pytest.raises(reading.PartialFileError, match="42 rows lost"):
    load_preferences("taskmaster", "test", tmp_path / "tm", tmp_path / "tfds")


def test_allow_partial_counts_every_lost_row_as_skipped(tmp_path, capsys):
  text, opening_line = corrupt_row(write_taskmaster_rewards(tmp_path / "tm", 72), row=30)
  (tmp_path / "tm/reward/reward_00.json").write_text(text)
  splits = {split: load_preferences("taskmaster", split, tmp_path / "tm", tmp_path / "tfds",
                                    allow_partial=True) for split in ("train", "test")}
  assert sum(len(s.prompts) for s in splits.values()) == 30
  assert splits["train"].rows_skipped == 42 and splits["test"].rows_skipped == 0
  assert sum(len(s.prompts) + s.rows_skipped for s in splits.values()) == 72
  assert splits["train"].skipped == [
      f"reward/reward_00.json:{opening_line}: unreadable from line {opening_line} "
      f"(42 rows lost): bad JSON: Expecting property name enclosed in double quotes "
      f"(line {opening_line + 1} column 9)"]
  assert "[data] warning: taskmaster: " in capsys.readouterr().out


def test_taskmaster_reward_file_cut_short_says_at_least_the_rows_started(tmp_path):
  text = write_taskmaster_rewards(tmp_path / "tm", 72)
  (tmp_path / "tm/reward/reward_00.json").write_text(text[:len(text) // 2])
  with pytest.raises(reading.PartialFileError,
                     match=r"reward_00.json is unreadable from line \d+ \(at least 1 row lost: "
                           "the file ends before its JSON array closes\\)"):
    load_preferences("taskmaster", "train", tmp_path / "tm", tmp_path / "tfds")
  train = load_preferences("taskmaster", "train", tmp_path / "tm", tmp_path / "tfds",
                           allow_partial=True)
  assert train.rows_skipped == 1


def test_truncated_gzip_jsonl_is_a_partial_file_error_with_unknown_rows_lost(tmp_path):
  rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(400)]
  write_lines(f"{tmp_path}/mine/train.jsonl.gz", rows, gz=True)
  data = (tmp_path / "mine/train.jsonl.gz").read_bytes()
  (tmp_path / "mine/train.jsonl.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(reading.PartialFileError,
                     match=r"train.jsonl.gz is unreadable from line \d+ \(an unknown number of "
                           r"rows lost: the rest of the file\): EOFError.*"
                           r"--config.reward.data.allow_partial=True"):
    load_preferences("jsonl_preferences", "train", tmp_path / "mine", tmp_path / "tfds")
  train = load_preferences("jsonl_preferences", "train", tmp_path / "mine", tmp_path / "tfds",
                           allow_partial=True)
  read = len(train.prompts)
  assert 0 < read < 400 and train.chosen == [f"good {i}" for i in range(read)]
  assert train.rows_skipped == 0  # the rows after the break cannot be counted
  assert train.skipped == [f"train.jsonl.gz:{read + 1}: unreadable from line {read + 1} (an "
                           "unknown number of rows lost: the rest of the file): EOFError: "
                           "Compressed file ended before the end-of-stream marker was reached"]


def test_taskmaster_empty_generation_is_kept_as_a_labelled_row(tmp_path):
  to_train = user_text_in("train")
  rows = [taskmaster_row("dlg-1", to_train, {"role": "agent", "text": ""}, 0.0),
          taskmaster_row("dlg-2", to_train, {"role": "agent", "text": "  "}, 0.0),
          {**taskmaster_row("dlg-3", to_train, {}, 0.0), "generation": ""},
          taskmaster_row("dlg-4", to_train, {}, 1.0),
          taskmaster_row("dlg-5", to_train, {"role": "agent", "text": "Hot or iced?"}, 1.0),
          taskmaster_row("dlg-6", to_train, {"role": "user", "text": ""}, 0.0),
          taskmaster_row("dlg-7", user_text_in("test"), {"role": "agent", "text": ""}, 0.0)]
  os.makedirs(tmp_path / "tm/reward")
  (tmp_path / "tm/reward/reward_00.json").write_text(json.dumps(rows, indent=4))
  train = load_preferences("taskmaster", "train", tmp_path / "tm", tmp_path / "tfds")
  assert train.chosen == ["", "", "", "", "Hot or iced?"]
  assert train.labels.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
  assert train.conversation_ids == ["dlg-1", "dlg-2", "dlg-3", "dlg-4", "dlg-5"]
  assert [line.split(": ", 1)[1] for line in train.skipped] == ["generation is not an agent turn"]


def test_editing_a_manual_file_prepares_fresh_data_in_the_same_data_dir(tmp_path, capsys):
  write_taskmaster_rewards(tmp_path / "tm", 72)
  count = lambda: sum(len(load_preferences("taskmaster", split, tmp_path / "tm",
                                           tmp_path / "tfds").prompts)
                      for split in ("train", "test"))
  assert count() == 72
  first = capsys.readouterr().out
  assert first.count("[data] preparing taskmaster from") == 1
  assert "[data] prepared taskmaster: train " in first
  assert count() == 72 and capsys.readouterr().out == ""  # the cache, reused silently
  write_taskmaster_rewards(tmp_path / "tm", 30)
  assert count() == 30
  assert capsys.readouterr().out.count("[data] preparing taskmaster from") == 1
  assert len(list((tmp_path / "tfds").glob("taskmaster-*"))) == 2


def test_fingerprint_follows_content_not_mtime(tmp_path):
  write_taskmaster_rewards(tmp_path / "tm", 5)
  (tmp_path / "tm/reward/notes.txt").write_text("not read by the builder")
  first = loader.data_fingerprint("taskmaster", tmp_path / "tm")
  assert first["dataset"] == "taskmaster" and first["config"] == ""
  assert first["builder_version"] == str(taskmaster.Taskmaster.VERSION)
  path = tmp_path / "tm/reward/reward_00.json"
  data = path.read_bytes()
  assert first["files"] == {"reward/reward_00.json": {
      "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
  os.utime(path, (1_000_000, 1_000_000))
  (tmp_path / "tm/reward/notes.txt").write_text("edited, still not read")
  assert loader.data_fingerprint("taskmaster", tmp_path / "tm") == first
  path.write_bytes(data.replace(b"order 1.", b"order 7."))  # same size, other content
  edited = loader.data_fingerprint("taskmaster", tmp_path / "tm")
  assert edited["files"]["reward/reward_00.json"]["bytes"] == len(data)
  assert edited["sha256"] != first["sha256"]
  write_hh(tmp_path / "hh", subsets=anthropic_hh.SUBSETS)
  hh = {config: loader.data_fingerprint("anthropic_hh", tmp_path / "hh", config)
        for config in (None, "all", "helpful-base")}
  assert hh[None] == hh["all"] and hh[None]["config"] == "all"  # None is the default config
  assert len(hh["all"]["files"]) == 8 and list(hh["helpful-base"]["files"]) == [
      "helpful-base/test.jsonl.gz", "helpful-base/train.jsonl.gz"]


def test_check_manual_files_names_the_fix_for_anthropic_hh_all_with_only_harmless_base(tmp_path):
  write_hh(tmp_path / "hh", subsets=("harmless-base",))
  (tmp_path / "hh/README.md").write_text("harmless-base only")
  with pytest.raises(ValueError) as error:
    loader.check_manual_files("anthropic_hh", tmp_path / "hh", None)
  message = str(error.value)
  assert "\n" not in message
  assert message == (
      f"anthropic_hh (config 'all'): manual dir {tmp_path}/hh lacks helpful-base/, "
      "helpful-online/, helpful-rejection-sampled/; it holds README.md, harmless-base/; fix: "
      "read the subset present with --config.reward.data.config=harmless-base")
  loader.check_manual_files("anthropic_hh", tmp_path / "hh", "harmless-base")  # no error
  with pytest.raises(ValueError, match="lacks helpful-base/"):  # before TFDS prepares anything
    load_preferences("anthropic_hh", "train", tmp_path / "hh", tmp_path / "tfds")
  assert not (tmp_path / "tfds").exists()


def test_check_manual_files_for_every_builder_is_one_line(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "other").mkdir()
  (tmp_path / "other/data.csv").write_text("a,b")
  for name in loader.PREFERENCE_DATASETS:
    for folder, problem in (("nowhere", "does not exist"), ("empty", "is empty"),
                            ("other", "lacks")):
      with pytest.raises(ValueError) as error:
        loader.check_manual_files(name, tmp_path / folder, None)
      message = str(error.value)
      assert "\n" not in message and message.startswith(name)
      assert f"manual dir {tmp_path}/{folder} {problem}" in message
      assert "fix: " in message
