"""Small tokenizer directories for tests, built with `tokenizers` (no downloads).

- ChatML: a byte-level BPE (GPT-2 style), Qwen-like special tokens and template.
- Llama: a SentencePiece-style BPE (Metaspace, byte fallback), <s>/</s>, add_bos_token, and a
  Mixtral-like [INST] template that raises when roles do not alternate.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

TEXT = """\
The harbour wakes before the sun. Fishing boats slide out past the lighthouse, their engines
humming, while gulls argue over the nets. By seven the bakery has opened and the smell of warm
bread drifts along the quay. Children run to school; old men sit on benches and talk about the
weather, the tides, and the price of diesel. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14.
Punctuation! Questions? "Quotes", 'apostrophes', (parentheses), [brackets] and {braces}; a-b_c.
Café, naïve, déjà vu. 日本語のテキスト。中文文本。Emoji: 🙂 🚀 👍🏽 ✨.
Code: def f(x): return x * 2  # comment
    indented line	with a tab
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- else %}
        {{- message['content'] + eos_token }}
    {%- endif %}
{%- endfor %}
"""


def _corpus() -> list[str]:
    return TEXT.splitlines() * 3


def write_chatml_dir(path: Path, vocab_size: int = 600, **config_extra: object) -> Path:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML_TEMPLATE,
              "clean_up_tokenization_spaces": False, **config_extra}
    return _save(path, tok, config)


def write_llama_dir(path: Path, vocab_size: int = 600, **config_extra: object) -> Path:
    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    # The byte tokens must be ordinary vocabulary (not added tokens) for byte fallback: rebuild.
    state = json.loads(tok.to_str())
    vocab, merges = state["model"]["vocab"], [tuple(m) for m in state["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "chat_template": LLAMA_TEMPLATE,
              "clean_up_tokenization_spaces": False, **config_extra}
    return _save(path, tok, config)


def _save(path: Path, tok: Tokenizer, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path
