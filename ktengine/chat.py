"""`ktengine chat`: an interactive terminal chat with a running server.

Streams each answer, keeps the history, and understands /system TEXT, /clear, /regen, /quit.
The first Ctrl-C stops the answer being written (its partial text stays in the history); a
Ctrl-C at the prompt, or a second one during the same answer, exits. Input may be piped.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from typing import Any, TextIO

from ktengine.client import (
    APIConnectionError,
    APIError,
    APIResponseError,
    AsyncClient,
    AuthenticationError,
)
from ktengine.errors import KtengineError

HELP = ("commands: /system TEXT (set the system prompt; empty clears it), /clear (forget the "
        "history), /regen (answer the last message again), /quit")


class ChatSession:
    def __init__(self, client: AsyncClient, model: str, max_model_len: int | None,
                 system: str | None, params: dict[str, Any], out: TextIO | None = None) -> None:
        self.client = client
        self.model = model
        self.max_model_len = max_model_len
        self.system = system
        self.params = params
        self.history: list[dict[str, str]] = []
        self.out = out or sys.stdout
        self.interactive = sys.stdin.isatty()
        self._exit = False

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def run(self) -> int:
        if self.interactive:
            self.say(f"ktengine chat: {self.model} at {self.client.base_url}. {HELP}. "
                     "Ctrl-C stops an answer.")
        while not self._exit:
            try:
                line = input(">>> " if self.interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                self.say("")
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                await self.command(line)
            else:
                self.history.append({"role": "user", "content": line})
                await self.answer()
        return 0

    async def command(self, line: str) -> None:
        name, _, rest = line.partition(" ")
        if name in ("/quit", "/exit"):
            self._exit = True
        elif name == "/clear":
            self.history.clear()
            self.say("(history cleared)")
        elif name == "/system":
            self.system = rest.strip() or None
            self.say("(system prompt set)" if self.system else "(system prompt cleared)")
        elif name == "/regen":
            if self.history and self.history[-1]["role"] == "assistant":
                self.history.pop()
            if not self.history:
                self.say("(nothing to regenerate)")
                return
            await self.answer(new_message=False)
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"(unknown command {name}; {HELP})")

    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    async def answer(self, new_message: bool = True) -> None:
        """Streams one answer to the last user message; Ctrl-C stops it and keeps the text.

        new_message: the last message was just typed, so a failed answer takes it back out.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self._stream(new_message))
        presses = 0

        def on_sigint() -> None:
            nonlocal presses
            presses += 1
            if presses > 1:
                self._exit = True
            task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            await task
        except asyncio.CancelledError:
            if presses == 0:  # cancelled from outside, not by Ctrl-C
                raise
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)

    async def _stream(self, new_message: bool) -> None:
        text: list[str] = []
        start = time.monotonic()
        first: float | None = None
        usage: dict[str, int] | None = None
        num_chunks = 0
        reason = None
        try:
            async for delta in self.client.chat_stream(self.messages(), model=self.model,
                                                       **self.params):
                reason = delta.finish_reason or reason
                if delta.usage:
                    usage = delta.usage
                if delta.text:
                    if first is None:
                        first = time.monotonic()
                    num_chunks += 1
                    text.append(delta.text)
                    self.out.write(delta.text)
                    self.out.flush()
        except asyncio.CancelledError:
            self._finish(text, "stopped", num_chunks, start, first, None)
            raise
        except APIError as exc:  # the server refused, failed, or went away mid-answer
            self.out.write("\n" if text else "")
            full = getattr(exc, "code", None) == "context_length_exceeded"
            hint = " (/clear forgets the history)" if full else ""
            self.say(f"error: {exc.message}{hint}")
            if text:  # what came is kept: the conversation goes on from it
                self._finish(text, "error", num_chunks, start, first, None)
            elif new_message:
                self.history.pop()  # the message got no answer; let the user rephrase it
            return
        note = "aborted by the server" if reason == "abort" else ""
        self._finish(text, note, num_chunks, start, first, usage)

    def _finish(self, text: list[str], note: str, num_chunks: int, start: float,
                first: float | None, usage: dict[str, int] | None) -> None:
        end = time.monotonic()
        self.history.append({"role": "assistant", "content": "".join(text)})
        tokens = usage["completion_tokens"] if usage else num_chunks
        parts = [f"{'' if usage else '~'}{tokens} tokens"]
        if first is not None:
            parts.append(f"TTFT {(first - start) * 1000:.0f} ms")
            rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
            parts.append(f"{rate:.1f} tokens/s")
        if usage and self.max_model_len:
            parts.append(f"context {usage['total_tokens']}/{self.max_model_len}")
        stats = f"[{note + ' ' if note else ''}{', '.join(parts)}]"
        if self.interactive and self.out.isatty():
            stats = f"\033[2m{stats}\033[0m"
        self.say("\n" + stats)


async def _connect(args: argparse.Namespace) -> tuple[AsyncClient, str, int | None]:
    try:
        # timeout: the one non-streamed request, the model list (a server that takes the
        # connection and never answers is an error, not a silent wait)
        client = AsyncClient(args.url, api_key=args.api_key, connect_timeout=5.0, timeout=30.0)
    except APIError as exc:
        raise KtengineError(str(exc)) from None
    try:
        models = await client.models()
    except APIConnectionError:
        await client.close()
        raise KtengineError(f"no server answers at {client.base_url} (start one with "
                            "`ktengine serve`, or pass --url)") from None
    except AuthenticationError:
        await client.close()
        raise KtengineError(f"the server at {client.base_url} refused the API key "
                            "(pass --api-key)") from None
    except APIResponseError:
        await client.close()
        raise KtengineError(f"{client.base_url} is not an OpenAI-compatible server "
                            "(its /v1/models is not a model list)") from None
    except APIError as exc:
        await client.close()
        raise KtengineError(f"the server at {client.base_url} answered: {exc}") from None
    names = [m["id"] for m in models]
    model = args.model or (names[0] if names else None)
    if model is None or model not in names:
        await client.close()
        raise KtengineError(f"the server serves {', '.join(names) or 'no model'}, not {model}")
    card = next(m for m in models if m["id"] == model)
    return client, model, card.get("max_model_len")


async def _main(args: argparse.Namespace) -> int:
    client, model, max_model_len = await _connect(args)
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        return await ChatSession(client, model, max_model_len, args.system, params).run()
    finally:
        await client.close()


def run_chat(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise KtengineError("--max-tokens must be at least 1")
    if not 0.0 <= args.temperature <= 2.0:
        raise KtengineError("--temperature must be between 0 and 2")
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    # A plain loop rather than asyncio.run: its SIGINT handling would cancel the main task
    # instead of interrupting input().
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_main(args))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
