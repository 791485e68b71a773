"""Stream a chat answer from a running server with the official `openai` package.

    ktengine serve &                      # the built-in demo model on http://127.0.0.1:30000
    python examples/chat_stream_openai.py "Why do MoE models compute less per token?"
"""
from __future__ import annotations

import argparse

from openai import OpenAI


def main(args: argparse.Namespace) -> None:
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key or "none")
    model = client.models.list().data[0].id  # the server serves one model
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:  # the last chunk: token counts
            print(f"\n[{chunk.usage.prompt_tokens} prompt tokens, "
                  f"{chunk.usage.completion_tokens} completion tokens]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is a mixture of experts?")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    main(parser.parse_args())
