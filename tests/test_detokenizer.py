"""IncrementalDetokenizer: UTF-8 safety, agreement with a full decode, stop strings."""
from __future__ import annotations

import random

import pytest
from tokenizer_builders import TEXT, write_chatml_dir, write_llama_dir

from ktengine.detokenizer import IncrementalDetokenizer
from ktengine.model.tokenizer import Tokenizer

UNSEEN = "Crabs 🦀 and 漢字 and 🧑‍🚀, ünïcödé."  # characters the small vocabularies split into bytes


@pytest.fixture(scope="module", params=["bytelevel", "sentencepiece"])
def tokenizer(request, tmp_path_factory):
    build = write_chatml_dir if request.param == "bytelevel" else write_llama_dir
    return Tokenizer.from_dir(build(tmp_path_factory.mktemp(request.param)))


def _stream(tokenizer, ids, prompt=(), **kwargs):
    detok = IncrementalDetokenizer(tokenizer, prompt, **kwargs)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas, detok


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(UNSEEN, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces), "the test needs characters split over tokens"
    deltas, _ = _stream(tokenizer, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == UNSEEN


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("prompt_len", [0, 3, 12])
def test_deltas_concatenate_to_the_full_decode(tokenizer, skip_special_tokens, prompt_len):
    rng = random.Random(prompt_len)
    text_ids = tokenizer.encode(TEXT + UNSEEN, add_special_tokens=False)
    checked = 0
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        if rng.random() < 0.5:  # also realistic text: runs of ids from encoded text
            start = rng.randrange(len(text_ids))
            ids = text_ids[start:start + 40]
        prompt = text_ids[:prompt_len]
        full = tokenizer.decode(prompt + ids, skip_special_tokens=skip_special_tokens)
        expected = full[len(tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)):]
        if "\ufffd" in full:
            continue
        deltas, _ = _stream(tokenizer, ids, prompt, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected
        checked += 1
    assert checked > 50


def test_leading_space_after_prompt(tokenizer):
    prompt = tokenizer.encode("The harbour", add_special_tokens=False)
    ids = tokenizer.encode("The harbour wakes before", add_special_tokens=False)[len(prompt):]
    deltas, _ = _stream(tokenizer, ids, prompt)
    assert "".join(deltas) == " wakes before"


def test_stop_string_split_across_tokens(tokenizer):
    ids = tokenizer.encode("The harbour wakes before the sun.", add_special_tokens=False)
    stop = "bour wa"
    # The stop string must not be a single token's text, or the test proves nothing.
    assert not any(stop in tokenizer.decode([i]) for i in ids)
    _, detok = _stream(tokenizer, ids, stop=[stop])
    assert detok.text == "The har" and detok.stopped and detok.stop_reason == stop
    _, detok = _stream(tokenizer, ids, stop=[stop], include_stop_str_in_output=True)
    assert detok.text == "The harbour wa"


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer):
    ids = tokenizer.encode("the sun. the sun", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["sun!"])
    for i in ids:
        detok.add(i)
        assert not detok.text.endswith(("s", "su", "sun")), detok.text
    assert detok.flush() == "sun" and detok.text == "the sun. the sun" and not detok.stopped


def test_stop_string_at_first_token(tokenizer):
    ids = tokenizer.encode("The harbour", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], stop=["The"])
    assert detok.add(ids[0]) == "" and detok.stopped and detok.stop_reason == "The"
    assert [detok.add(i) for i in ids[1:]] == [""] * (len(ids) - 1)
    assert detok.flush() == "" and detok.text == ""


def test_earliest_of_several_stop_strings_wins(tokenizer):
    ids = tokenizer.encode("Fishing boats slide out past the lighthouse", add_special_tokens=False)
    _, detok = _stream(tokenizer, ids, stop=["lighthouse", "slide", "boats sl", "zzz"])
    assert detok.text == "Fishing " and detok.stop_reason == "boats sl"
    _, detok = _stream(tokenizer, ids, stop=["zzz", "yy"])
    assert detok.text == "Fishing boats slide out past the lighthouse" and not detok.stopped


def test_stop_string_inside_multibyte_text(tokenizer):
    ids = tokenizer.encode("Crabs 🦀 and 漢字 here", add_special_tokens=False)
    _, detok = _stream(tokenizer, ids, stop=["字"], include_stop_str_in_output=True)
    assert detok.text == "Crabs 🦀 and 漢字" and detok.stop_reason == "字"


def test_special_tokens_skipped_or_kept(tokenizer):
    eos = min(tokenizer.eos_token_ids)
    ids = tokenizer.encode("Hello", add_special_tokens=False) + [eos]
    _, detok = _stream(tokenizer, ids)
    assert detok.text == "Hello"
    _, detok = _stream(tokenizer, ids, skip_special_tokens=False)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=False)
