"""`ktengine chat` driven through a pipe against the running test server."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

from server_fixtures import free_port, server  # noqa: F401

STATS = re.compile(r"^\[(?:(\w+) )?(~?)(\d+) tokens, TTFT (\d+) ms, ([\d.]+) tokens/s"
                   r"(?:, context (\d+)/(\d+))?\]$")


def _chat_args(server, *extra: str) -> list[str]:  # noqa: F811
    return [sys.executable, "-m", "ktengine", "chat", "--url", server.url, "--api-key",
            server.api_key, "--max-tokens", "8", "--temperature", "0", *extra]


def _run(server, stdin: str, *extra: str) -> subprocess.CompletedProcess:  # noqa: F811
    return subprocess.run(_chat_args(server, *extra), input=stdin, capture_output=True, check=False,
                          text=True, timeout=60)


def _stats(stdout: str) -> list[re.Match]:
    return [m for line in stdout.splitlines() if (m := STATS.match(line))]


def test_conversation_and_commands(server):  # noqa: F811
    script = "hello there\nwhat now\n/regen\n/system Be brief.\nagain\n/clear\nagain\n/quit\nnever\n"
    r = _run(server, script)
    assert r.returncode == 0, r.stderr
    stats = _stats(r.stdout)
    assert len(stats) == 5  # hello, what now, regen, again, again (nothing after /quit)
    for m in stats:
        assert m.group(2) == "" and 1 <= int(m.group(3)) <= 8 and int(m.group(7)) == 512
    context = [int(m.group(6)) for m in stats]
    assert context[1] > context[0]  # the history goes along with the second message
    assert context[2] == context[1]  # /regen asks the same question again
    assert context[3] > context[2]  # the system prompt and the history
    assert context[4] < context[3]  # /clear forgot it (system prompt kept)
    lines = r.stdout.splitlines()
    answers = [lines[i - 1] for i, line in enumerate(lines) if STATS.match(line)]
    assert answers[1] == answers[2]  # greedy: /regen gives the same answer
    assert "(system prompt set)" in r.stdout and "(history cleared)" in r.stdout


def _run_in_process(server, stdin: str, *extra: str, capsys, monkeypatch):  # noqa: F811
    """The same command in this process (no interpreter start-up): (exit status, out, err)."""
    from ktengine.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(_chat_args(server, *extra)[3:])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_regen_without_history_and_unknown_command(server, capsys, monkeypatch):  # noqa: F811
    status, out, _ = _run_in_process(server, "/regen\n/frobnicate\n/help\n", capsys=capsys,
                                     monkeypatch=monkeypatch)
    assert status == 0
    assert "(nothing to regenerate)" in out and "unknown command /frobnicate" in out
    assert out.count("/system TEXT") == 2


def test_server_error_is_shown_and_chat_goes_on(server, capsys, monkeypatch):  # noqa: F811
    status, out, _ = _run_in_process(server, "word " * 600 + "\nhi\n", capsys=capsys,
                                     monkeypatch=monkeypatch)
    assert status == 0
    assert "error: " in out and "context" in out and "(/clear forgets the history)" in out
    [stats] = _stats(out)  # the next message is answered, without the failed one
    assert int(stats.group(6)) < 100


def test_wrong_key_and_unknown_model(server, capsys, monkeypatch):  # noqa: F811
    status, _, err = _run_in_process(server, "", "--api-key", "wrong", capsys=capsys,
                                     monkeypatch=monkeypatch)
    assert status == 2 and "refused the API key" in err
    status, _, err = _run_in_process(server, "", "--model", "gpt-17", capsys=capsys,
                                     monkeypatch=monkeypatch)
    assert status == 2 and "not gpt-17" in err


def test_no_server_is_a_clear_one_line_error():
    r = subprocess.run([sys.executable, "-m", "ktengine", "chat", "--url",
                        f"http://127.0.0.1:{free_port()}"], input="hi\n", capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("ktengine: error: no server answers at http://127.0.0.1:")


class _Reader(threading.Thread):
    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.text = stream, ""

    def run(self) -> None:
        for chunk in iter(lambda: os.read(self.stream.fileno(), 4096), b""):
            self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.text, re.MULTILINE):
            assert time.monotonic() < deadline, f"no {pattern!r} in {self.text!r}"
            time.sleep(0.01)


def test_ctrl_c_stops_the_answer_then_exits(server):  # noqa: F811
    args = _chat_args(server)
    args[args.index("--max-tokens") + 1] = "400"
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = _Reader(proc.stdout)
    out.start()
    try:
        proc.stdin.write(b"tell me a long story\n")
        proc.stdin.flush()
        out.wait_for(r"\S")  # the answer has begun
        proc.send_signal(signal.SIGINT)  # first Ctrl-C: stop the answer, keep the text
        out.wait_for(r"^\[stopped ~\d+ tokens")
        proc.send_signal(signal.SIGINT)  # second one, at the prompt: exit
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out.join(5)
    stopped = STATS.match(out.text.strip().splitlines()[-1])
    assert stopped and stopped.group(1) == "stopped" and int(stopped.group(3)) < 400


class _CuttingServer(threading.Thread):
    """An OpenAI-looking server in its own thread: its first chat answer dies after one chunk,
    the next ones complete. Records each request's messages."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.port, self.requests, self.ready = free_port(), [], threading.Event()

    def run(self) -> None:
        import asyncio
        import json

        from aiohttp import web

        async def models(request):
            return web.json_response({"object": "list", "data": [
                {"id": "m", "object": "model", "max_model_len": 512}]})

        async def chat(request):
            self.requests.append((await request.json())["messages"])
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            chunk = {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if len(self.requests) == 1:
                await asyncio.sleep(0.05)
                request.transport.close()
                return resp
            done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
            return resp

        async def main():
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/chat/completions", chat)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.ready.set()
            await asyncio.sleep(3600)

        asyncio.run(main())


def test_a_server_dying_mid_answer_keeps_the_conversation(capsys, monkeypatch):
    from ktengine.cli import main

    srv = _CuttingServer()
    srv.start()
    assert srv.ready.wait(10)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    status = main(["chat", "--url", f"http://127.0.0.1:{srv.port}", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert status == 0
    assert "half" in out and "error: connection to" in out and "[error " in out
    # the second message goes with the first and its partial answer
    assert srv.requests[1][-3:] == [{"role": "user", "content": "first"},
                                    {"role": "assistant", "content": "half"},
                                    {"role": "user", "content": "second"}]
