"""The server through the official `openai` package, sync and async, streaming and not."""
from __future__ import annotations

import openai
import pytest
from server_fixtures import server  # noqa: F401  (the session's `ktengine serve` process)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about mixture-of-experts models."}]


@pytest.fixture
def client(server):  # noqa: F811
    with openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(server):  # noqa: F811
    async with openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0) as c:
        yield c


def _stream_chat(client, **kw):
    """(text per choice, finish chunks per choice, roles seen, usage chunks, all chunks)."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts, finishes, roles, usages = {}, {}, {}, []
    for ch in chunks:
        if not ch.choices:
            usages.append(ch.usage)
            continue
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.delta.role:
                roles.setdefault(c.index, []).append(c.delta.role)
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    return texts, finishes, roles, usages, chunks


def test_models(client, server):  # noqa: F811
    models = client.models.list().data
    assert [m.id for m in models] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_shape(client, server):  # noqa: F811
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8,
                                       temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.model == server.model and r.created > 0
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8


def test_chat_stream_shape_and_equal_to_non_streamed(client, server):  # noqa: F811
    kw = {"model": server.model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    full = client.chat.completions.create(**kw)
    texts, finishes, roles, usages, chunks = _stream_chat(
        client, stream_options={"include_usage": True}, **kw)
    assert texts[0] == full.choices[0].message.content
    assert finishes == {0: [full.choices[0].finish_reason]}  # exactly one finish chunk
    assert roles == {0: ["assistant"]}
    assert chunks[0].choices[0].delta.role == "assistant"  # the first chunk carries the role
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    [usage] = usages
    assert chunks[-1].usage == usage and not chunks[-1].choices  # the usage chunk comes last
    assert usage.completion_tokens == full.usage.completion_tokens
    assert usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_without_usage_has_no_usage_chunk(client, server):  # noqa: F811
    _, finishes, _, usages, chunks = _stream_chat(client, model=server.model, messages=MESSAGES,
                                                  max_tokens=4)
    assert usages == [] and all(c.usage is None for c in chunks)
    assert len(finishes[0]) == 1


def test_seed_is_deterministic(client, server):  # noqa: F811
    kw = {"model": server.model, "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0}
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=4321, **kw).choices[0].message.content
    assert a == b
    assert a != c  # 16 tokens sampled at temperature 1 from a 4k vocabulary


def test_n_choices(client, server):  # noqa: F811
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8,
                                       temperature=1.0, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seeds 5, 6, 7
    assert 3 <= r.usage.completion_tokens <= 3 * 8
    # seed + i: the second choice equals a single request seeded 6
    single = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=8,
                                            temperature=1.0, seed=6)
    assert single.choices[0].message.content == r.choices[1].message.content


def test_n_choices_streamed(client, server):  # noqa: F811
    texts, finishes, roles, usages, _ = _stream_chat(
        client, model=server.model, messages=MESSAGES, max_tokens=6, temperature=1.0, seed=9,
        n=2, stream_options={"include_usage": True})
    assert sorted(finishes) == [0, 1] and all(len(f) == 1 for f in finishes.values())
    assert roles == {0: ["assistant"], 1: ["assistant"]}
    full = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6,
                                          temperature=1.0, seed=9, n=2)
    assert [texts[0], texts[1]] == [c.message.content for c in full.choices]
    assert usages[0].completion_tokens == full.usage.completion_tokens


def test_logit_bias_steers_every_token(client, server):  # noqa: F811
    r = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                  logit_bias={"42": 100}, logprobs=0)
    assert r.choices[0].logprobs.tokens and all(
        t == r.choices[0].logprobs.tokens[0] for t in r.choices[0].logprobs.tokens)
    forced = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=1,
                                       temperature=0, logit_bias={"42": 100})
    plain = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=1,
                                      temperature=0)
    assert forced.choices[0].text == r.choices[0].logprobs.tokens[0]
    banned = client.completions.create(model=server.model, prompt=[5, 6, 7], max_tokens=1,
                                       temperature=0, logit_bias={"42": -100})
    assert banned.choices[0].text != forced.choices[0].text or plain.choices[0].text != forced.choices[0].text


def test_chat_logprobs(client, server):  # noqa: F811
    r = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        assert entry.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy takes the argmax
    if r.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == r.choices[0].message.content
    # streamed logprobs arrive token by token and agree
    chunks = list(client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3, stream=True))
    streamed = [e for ch in chunks for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    plain = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completions(client, server):  # noqa: F811
    r = client.completions.create(model=server.model, prompt="The experts of a layer",
                                  max_tokens=8, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
    stream = client.completions.create(model=server.model, prompt="The experts of a layer",
                                       max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == r.choices[0].text
    assert sum(1 for ch in chunks for c in ch.choices if c.finish_reason) == 1
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_prompt_forms_and_echo(client, server):  # noqa: F811
    text = client.completions.create(model=server.model, prompt="one two", max_tokens=4,
                                     temperature=0).choices[0].text
    r = client.completions.create(model=server.model, prompt=["one two", "three four"],
                                  max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == text  # greedy: both choices agree
    echoed = client.completions.create(model=server.model, prompt="one two", max_tokens=4,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text == "one two" + text
    streamed = "".join(c.text for ch in client.completions.create(
        model=server.model, prompt="one two", max_tokens=4, temperature=0, echo=True,
        stream=True) for c in ch.choices)
    assert streamed == "one two" + text


def test_completions_token_ids_and_logprobs(client, server):  # noqa: F811
    r = client.completions.create(model=server.model, prompt=[[5, 6, 7, 8], [9, 10]],
                                  max_tokens=3, temperature=0, logprobs=2)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 6
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert "".join(lp.tokens) == c.text or c.finish_reason == "stop"
        assert lp.text_offset[0] == 0
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs):
            assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values()), abs=1e-4)


def test_stop_string(client, server):  # noqa: F811
    kw = {"model": server.model, "messages": MESSAGES, "temperature": 0,
          "extra_body": {"ignore_eos": True}}
    text = client.chat.completions.create(max_tokens=16, **kw).choices[0].message.content
    assert len(text) >= 4
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = client.chat.completions.create(max_tokens=16, stop=[stop, "never-seen"], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.index(stop)]


def test_errors_are_typed(client, server):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    with (openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0) as bad,
          pytest.raises(openai.AuthenticationError)):
        bad.models.list()


async def test_async_client(aclient, server):  # noqa: F811
    kw = {"model": server.model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    full = await aclient.chat.completions.create(**kw)
    text = ""
    async for chunk in await aclient.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == full.choices[0].message.content
    comp = await aclient.completions.create(model=server.model, prompt="hello", max_tokens=4,
                                            temperature=0)
    text = ""
    async for chunk in await aclient.completions.create(model=server.model, prompt="hello",
                                                        max_tokens=4, temperature=0, stream=True):
        text += "".join(c.text for c in chunk.choices)
    assert text == comp.choices[0].text
