"""Tokenizer: tokenizer.json through `tokenizers`, chat templates through jinja2.

Behaves like transformers' fast tokenizer on the same files (same ids, same decoded text, same
rendered chat), without importing transformers: named special tokens from tokenizer_config.json
are registered as special, and chat templates render in the same sandboxed jinja2 environment.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _Backend

from ktengine.errors import KtengineError, ModelLoadError
from ktengine.model.hf_config import read_json_object

# one text at a time needs no thread pool of the tokenizers library's own (one thread per core
# otherwise, and a warning in every forked child once it has run); a user's setting wins
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(KtengineError, ValueError):
    """The model has no chat template, or the template rejected the messages."""


class Tokenizer:
    """Text <-> token ids for one model directory, plus its chat template."""

    def __init__(self, backend: _Backend, tokenizer_config: dict[str, Any],
                 generation_config: dict[str, Any] | None = None,
                 model_config: dict[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        self._backend = backend
        self._special_tokens = _named_special_tokens(tokenizer_config)
        extra = tokenizer_config.get("additional_special_tokens") or []
        extra = list(extra) + list(tokenizer_config.get("extra_special_tokens") or [])
        # Like transformers: named and extra special tokens become special added tokens.
        to_add = list(self._special_tokens.values()) + [_token_str(t) for t in extra]
        if to_add:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                        for t in to_add])
        # add_bos_token/add_eos_token in tokenizer_config.json are ignored, as transformers 5 does
        # when tokenizer.json exists: its post-processor decides which special tokens encode adds.
        self._clean_up_spaces = (bool(tokenizer_config.get("clean_up_tokenization_spaces"))
                                 and type(backend.model).__name__ != "BPE")

        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id: int | None = self._id_of("bos_token")
        self.pad_token_id: int | None = self._id_of("pad_token")
        eos = {self._id_of("eos_token")}
        for cfg in (generation_config or {}, model_config or {}):
            value = cfg.get("eos_token_id")
            eos.update(value if isinstance(value, list) else [value])
        self.eos_token_ids: frozenset[int] = frozenset(i for i in eos if i is not None)
        if self.bos_token_id is None and model_config and "bos_token" not in tokenizer_config:
            self.bos_token_id = model_config.get("bos_token_id")
        specials = {tid for tid, tok in backend.get_added_tokens_decoder().items() if tok.special}
        self.special_token_ids: frozenset[int] = frozenset(specials)
        self.chat_template: str | None = chat_template
        self._compiled: tuple[str, jinja2.Template] | None = None  # (source, template)
        # how a token's piece maps to bytes (token_bytes)
        self._added = {tid: tok.content for tid, tok in backend.get_added_tokens_decoder().items()}
        self._byte_level = "ByteLevel" in (type(backend.decoder).__name__,
                                           type(backend.pre_tokenizer).__name__)
        self._byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        self._metaspace = type(backend.pre_tokenizer).__name__ == "Metaspace"

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json and, when present, chat_template.jinja,
        generation_config.json and config.json (for eos/bos fallbacks) from a model directory."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"tokenizer file not found: {tokenizer_file}")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # noqa: BLE001 (the tokenizers library raises a bare Exception)
            raise ModelLoadError(f"cannot load {tokenizer_file}: {exc}") from None
        tokenizer_config = _read_json(path / "tokenizer_config.json") or {}
        # Older checkpoints keep the named special tokens in special_tokens_map.json.
        for name, token in (_read_json(path / "special_tokens_map.json") or {}).items():
            tokenizer_config.setdefault(name, token)
        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: the "default" one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, tokenizer_config, _read_json(path / "generation_config.json"),
                   _read_json(path / "config.json"), template)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not), so a long text tokenized in a worker
        # thread leaves the event loop running
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Token strings (byte-level ones look like "Ġword"); None for an id outside the vocab."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for, which decoding it alone may not show: a byte-level
        token holding half of a UTF-8 character decodes to U+FFFD, and its bytes rebuild the
        character across tokens (the OpenAI logprobs `bytes` field)."""
        added = self._added.get(token_id)
        if added is not None:
            return added.encode("utf-8")
        piece = self._backend.id_to_token(int(token_id))
        if piece is None:
            return b""
        if self._byte_level:
            try:
                return bytes(_BYTE_OF_CHAR[c] for c in piece)
            except KeyError:  # not a byte-level piece after all
                pass
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if self._metaspace:
            return piece.replace("\u2581", " ").encode("utf-8")
        return self.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render messages with the model's chat template, as transformers would.

        Message content may be a string or a list of text parts; parts are joined with newlines.
        Extra keyword arguments (e.g. enable_thinking) are passed to the template.
        """
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        variables = {**self._special_tokens, "documents": None, **kwargs}
        try:
            if self._compiled is None or self._compiled[0] != self.chat_template:
                self._compiled = (self.chat_template, _compile(self.chat_template))
            return self._compiled[1].render(
                messages=[_normalize_message(m) for m in messages], tools=tools,
                add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Render, then encode without adding special tokens: the template writes its own BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def _id_of(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._backend.token_to_id(token)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE writes byte b as one printable character: itself for the printable
    Latin-1 bytes (! to ~, ¡ to ¬, ® to ÿ), else chr(256 + n) for the n-th other byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None


def _token_str(token: str | dict) -> str:
    # Older tokenizer_config.json files serialise tokens as {"content": ..., "lstrip": ...}.
    return token["content"] if isinstance(token, dict) else token


def _named_special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    return {name: _token_str(tokenizer_config[name]) for name in _NAMED_SPECIAL
            if tokenizer_config.get(name) is not None}


def _clean_up_spaces(text: str) -> str:
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


def _normalize_message(message: dict) -> dict:
    # Drop None values (templates render them as "None"), flatten text parts into one string.
    message = {k: v for k, v in message.items() if v is not None}
    # Like transformers: reasoning under any of its names reaches templates under the usual two.
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    content = message.get("content")
    if isinstance(content, list):
        parts = [p if isinstance(p, str) else p.get("text", "") for p in content
                 if isinstance(p, str) or p.get("type", "text") == "text"]
        message["content"] = "\n".join(parts)
    return message


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    # for inference keeps the body as it is.
    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)
