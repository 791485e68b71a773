"""Stream a chat answer from a running server with ktengine's own async client.

    ktengine serve &                      # the built-in demo model on http://127.0.0.1:30000
    python examples/chat_stream_client.py "Why do MoE models compute less per token?"
"""
from __future__ import annotations

import argparse
import asyncio

from ktengine.client import AsyncClient


async def main(args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": args.prompt}]
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        async for delta in client.chat_stream(messages, max_tokens=args.max_tokens,
                                              temperature=args.temperature):
            print(delta.text, end="", flush=True)
            if delta.usage:  # the last delta: token counts
                print(f"\n[{delta.usage['prompt_tokens']} prompt tokens, "
                      f"{delta.usage['completion_tokens']} completion tokens]")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="What is a mixture of experts?")
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    asyncio.run(main(parser.parse_args()))
