"""Request bodies of the OpenAI API as msgspec structs, and their conversion to SamplingParams.

msgspec checks types while decoding (a wrong type names its JSON path); ranges and the
combinations of fields are checked here and in SamplingParams.validate, so every bad request
becomes a 400 that names the offending parameter. Unknown fields are ignored, as OpenAI does.
"""
from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from ktengine.request import SamplingError, SamplingParams
from ktengine.server.errors import APIError, bad_request

MAX_N = 16  # choices per request; each one holds its own KV memory
MAX_TOP_LOGPROBS = 20
MAX_PROMPTS = 256  # prompts in one completions request


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ContentPart(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Common, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


T = TypeVar("T", ChatCompletionRequest, CompletionRequest)

_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode(body: bytes, kind: type[T]) -> T:
    """Parses a request body; malformed JSON or a wrong type is a 400 naming the field."""
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        # msgspec writes a mapping's values as `field[...]`: the field is the parameter
        param = match.group(1).replace("[...]", "") if match and match.group(1) else None
        missing = re.match(r"Object missing required field `(\w+)`", message)
        if missing:
            param = (param + "." if param else "") + missing.group(1)
        return _raise(bad_request(f"invalid request: {message}", param, "invalid_type"))
    except msgspec.DecodeError as exc:
        return _raise(bad_request(f"invalid JSON: {exc}", None, "invalid_json"))
    except UnicodeDecodeError:  # a string that is not UTF-8
        return _raise(bad_request("invalid JSON: the body is not valid UTF-8", None, "invalid_json"))
    except RecursionError:  # nesting deeper than the decoder goes, in an ignored field too
        return _raise(bad_request("invalid JSON: nested too deeply", None, "invalid_json"))


def _raise(error: APIError) -> Any:
    raise error


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise bad_request(f"{param} {message}", param, "invalid_value")


def sampling_params(req: ChatCompletionRequest | CompletionRequest, max_tokens: int) -> SamplingParams:
    """Checks the shared fields and builds the engine's sampling parameters."""
    _check(1 <= req.n <= MAX_N, "n", f"must be between 1 and {MAX_N}")
    # choice i draws with seed + i: every one must be a 64-bit integer
    _check(req.seed is None or -2**63 <= req.seed <= 2**63 - req.n, "seed",
           "must be a 64-bit integer")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options needs stream: true", "stream_options", "invalid_value")
    _check(max_tokens >= 1, "max_tokens", "must be at least 1")
    bias = None
    if req.logit_bias:
        try:  # OpenAI sends token ids as JSON object keys (strings)
            bias = {int(t): float(b) for t, b in req.logit_bias.items()}
        except (TypeError, ValueError):
            raise bad_request("logit_bias keys must be token ids (integers as strings)",
                              "logit_bias", "invalid_value") from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        _check(req.top_logprobs is None or 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS,
               "top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        _check(req.logprobs is None or 0 <= req.logprobs <= MAX_TOP_LOGPROBS,
               "logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}")
        logprobs = req.logprobs
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=bias,
    )
    try:
        params.validate()
    except SamplingError as exc:
        raise bad_request(str(exc), exc.param, "invalid_value") from None
    return params


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as plain dicts for the chat template; text parts only."""
    if not req.messages:
        raise bad_request("messages must not be empty", "messages", "invalid_value")
    if req.tools:
        raise bad_request("tools are not supported", "tools", "unsupported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format type 'text' is supported", "response_format",
                          "unsupported")
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant, not "
                              f"{m.role!r}", f"messages[{i}].role", "invalid_value")
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise bad_request(f"only text content parts are supported (got type "
                                      f"{part.type!r})", f"messages[{i}].content[{j}]",
                                      "unsupported")
                if part.text is None:
                    raise bad_request(f"messages[{i}].content[{j}] is a text part without text",
                                      f"messages[{i}].content[{j}].text", "invalid_value")
            content = "\n".join(p.text or "" for p in content)
        if content is None:
            if role != "assistant":
                raise bad_request(f"messages[{i}].content is missing", f"messages[{i}].content",
                                  "invalid_value")
            content = ""
        out.append({"role": role, "content": content})
    return out


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompt field as a list of prompts, each text or token ids."""
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix", "unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of is not supported (leave it unset or equal to n)", "best_of",
                          "unsupported")
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and all(_is_token_id(t) for t in prompt):
        prompts = [prompt]
    elif prompt and all(_is_text_or_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                          "list of lists of token ids, and not empty", "prompt", "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", "prompt", "invalid_value")
    for p in prompts:
        if isinstance(p, str) and not p:
            raise bad_request("prompt must not be empty", "prompt", "invalid_value")
    return prompts


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _is_text_or_ids(p: Any) -> bool:
    return isinstance(p, str) or (isinstance(p, list) and bool(p) and all(map(_is_token_id, p)))
