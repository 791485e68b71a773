"""Tokenizer against transformers' fast tokenizer on the same files: ids, text, chat rendering."""
from __future__ import annotations

import json
import threading
import time

import pytest
import transformers
from tokenizer_builders import TEXT, write_chatml_dir, write_llama_dir

from ktengine.errors import ModelLoadError
from ktengine.model.tokenizer import ChatTemplateError, Tokenizer

SAMPLES = ["Hello world", " the harbour 🙂 日本語", TEXT, "<|im_start|>user\nhi<|im_end|>",
           "<s>[INST] x [/INST]</s>", "", "   leading and trailing   ", "naïve café\n\n\ttab"]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "日本語?"}],
]


# The last one says add_eos_token, which transformers 5 ignores when tokenizer.json exists.
@pytest.fixture(params=["chatml", "llama", "llama-add-eos"])
def tokenizer_dir(request, tmp_path):
    if request.param == "chatml":
        return write_chatml_dir(tmp_path / request.param)
    extra = {"add_eos_token": True} if request.param == "llama-add-eos" else {}
    return write_llama_dir(tmp_path / request.param, **extra)


def _pair(path):
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def test_encode_decode_match_transformers(tokenizer_dir):
    ours, ref = _pair(tokenizer_dir)
    assert ours.vocab_size == len(ref)
    for text in SAMPLES:
        for add_special in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special)
            assert ids == ref.encode(text, add_special_tokens=add_special), (text, add_special)
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
            assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
            assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)


def test_encoding_a_long_text_lets_other_threads_run(tmp_path):
    """The server tokenizes in a worker thread; the event loop must keep running meanwhile.
    With the GIL held for the whole encode this thread would not wake once before it ends."""
    tok = Tokenizer.from_dir(write_chatml_dir(tmp_path / "t"))
    text = TEXT * (1_000_000 // len(TEXT) + 1)
    started, done = threading.Event(), threading.Event()

    def encode():
        started.set()
        tok.encode(text)
        done.set()

    worker = threading.Thread(target=encode)
    worker.start()
    started.wait()
    wakes = 0
    while not done.is_set():
        time.sleep(0.001)
        wakes += 1
    worker.join()
    assert wakes >= 20
    assert tok.encode(TEXT * 3) == tok.encode(TEXT + TEXT + TEXT)


def test_special_tokens_match_transformers(tokenizer_dir):
    ours, ref = _pair(tokenizer_dir)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.eos_token_ids == {ref.eos_token_id}
    assert set(ref.all_special_ids) <= ours.special_token_ids


def test_llama_style_adds_bos_once(tmp_path):
    ours, ref = _pair(write_llama_dir(tmp_path))
    bos = ours.bos_token_id
    assert ours.encode("hi")[0] == bos and ours.encode("hi", add_special_tokens=False)[0] != bos
    ids = ours.encode_chat([{"role": "user", "content": "hi"}])
    assert ids.count(bos) == 1
    assert ids == ref.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True,
                                          return_dict=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_rendering_matches_transformers(tokenizer_dir, add_generation_prompt):
    ours, ref = _pair(tokenizer_dir)
    for chat in CHATS:
        if "llama" in str(tokenizer_dir):
            chat = [m for m in chat if m["role"] != "system"]
        expected = ref.apply_chat_template(chat, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(chat, add_generation_prompt) == expected
        expected_ids = ref.apply_chat_template(chat, tokenize=True, return_dict=False,
                                               add_generation_prompt=add_generation_prompt)
        assert ours.encode_chat(chat, add_generation_prompt) == list(expected_ids)


def test_chatml_rendering_is_exact(tmp_path):
    ours = Tokenizer.from_dir(write_chatml_dir(tmp_path))
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_content_parts_are_joined(tmp_path):
    ours = Tokenizer.from_dir(write_chatml_dir(tmp_path))
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    assert ours.apply_chat_template(parts) == ours.apply_chat_template(
        [{"role": "user", "content": "a\nb"}])


def test_reasoning_field_aliases_match_transformers(tmp_path):
    path = write_chatml_dir(tmp_path)
    ours, ref = _pair(path)
    template = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]{% endfor %}"
    ours.chat_template = template
    chat = [{"role": "assistant", "content": "a", "reasoning": "r1"},
            {"role": "assistant", "content": "b", "thinking": "r2", "tool_calls": None}]
    expected = ref.apply_chat_template(chat, chat_template=template, tokenize=False)
    assert ours.apply_chat_template(chat, add_generation_prompt=False) == expected == "[r1|r1][r2|r2]"


def test_role_alternation_error_is_one_line(tmp_path):
    ours = Tokenizer.from_dir(write_llama_dir(tmp_path))
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate") as info:
        ours.apply_chat_template(chat)
    assert "\n" not in str(info.value)


def test_template_helpers(tmp_path):
    template = ("{{ messages[0]['content'] | tojson }}|{{ tools | tojson(indent=2) }}|"
                "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.role }}"
                "{% endfor %}|{{ strftime_now('%Y') | length }}|{{ eos_token }}|{{ flag }}")
    path = write_chatml_dir(tmp_path)
    ours = Tokenizer.from_dir(path)
    ours.chat_template = template
    chat = [{"role": "user", "content": "<é>"}, {"role": "assistant", "content": "x"}]
    tools = [{"name": "f"}]
    ref = transformers.AutoTokenizer.from_pretrained(path)
    expected = ref.apply_chat_template(chat, tools=tools, chat_template=template, tokenize=False,
                                       flag="on")
    assert ours.apply_chat_template(chat, tools=tools, flag="on") == expected
    assert expected.startswith('"<é>"|[\n  {\n    "name": "f"\n  }\n]|assistant|4|<|im_end|>|on')


def test_template_sources(tmp_path):
    path = write_chatml_dir(tmp_path, chat_template=[{"name": "default", "template": "D"},
                                                     {"name": "tool_use", "template": "T"}])
    assert Tokenizer.from_dir(path).chat_template == "D"
    (path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert Tokenizer.from_dir(path).apply_chat_template([{"role": "user", "content": ""}]) == "J1"


def test_no_chat_template_is_a_clear_error(tmp_path):
    ours = Tokenizer.from_dir(write_chatml_dir(tmp_path, chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_eos_ids_gather_all_sources(tmp_path):
    path = write_chatml_dir(tmp_path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}))
    ours = Tokenizer.from_dir(path)
    assert ours.eos_token_ids == {0, 1, 2}
    assert ours.bos_token_id is None  # tokenizer_config.json says bos_token: null


def test_token_bytes_rebuild_the_text(tmp_path):
    """Each token's bytes, joined, give the text's UTF-8 (a Metaspace tokenizer's first piece
    carries the space it prepends), also where a token holds part of a character."""
    for write in (write_chatml_dir, write_llama_dir):
        tok = Tokenizer.from_dir(write(tmp_path / write.__name__))
        for text in SAMPLES:
            ids = tok.encode(text, add_special_tokens=False)
            joined = b"".join(tok.token_bytes(i) for i in ids)
            assert joined.decode("utf-8") in (text, " " + text), (write.__name__, text)
    tok = Tokenizer.from_dir(tmp_path / "write_chatml_dir")
    split = [i for i in tok.encode("🙂👍🏽✨", add_special_tokens=False) if tok.decode([i]) == "\ufffd"]
    assert split  # the small vocabulary cuts these characters into byte tokens
    assert all(len(tok.token_bytes(i)) < 4 and tok.token_bytes(i) != "\ufffd".encode() for i in split)
