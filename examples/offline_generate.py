"""Offline generation with the Python API: several prompts batched together.

    python examples/offline_generate.py            # the built-in demo model
    python examples/offline_generate.py /path/to/hf-checkpoint
"""
import asyncio
import sys

from ktengine import AsyncEngine, EngineConfig, SamplingParams


async def main(model: str | None) -> None:
    engine = AsyncEngine(EngineConfig(model=model))
    questions = ["What is a mixture of experts?", "Name three colours.", "Write a haiku about RAM."]
    params = SamplingParams(max_tokens=48, temperature=0.7, top_p=0.9)

    async def answer(question: str) -> str:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
        text = ""
        async for out in engine.generate(ids, params):  # one increment per step
            text += out.delta_text
        return text

    try:
        for question, text in zip(questions, await asyncio.gather(*map(answer, questions))):
            print(f"> {question}\n{text}\n")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
