"""The `ktengine` command: serve, chat, generate, placement, version.

Errors a user can cause print one line (`ktengine: error: ...`) and exit with status 2.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import TYPE_CHECKING

from ktengine import env
from ktengine.errors import KtengineError
from ktengine.options import MAX_CPU_THREADS, RECORDER_MODES, PlacementStrategy, WeightFormat

if TYPE_CHECKING:
    from ktengine.config import EngineConfig


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads a model."""
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", default=None,
                   help="Hugging Face checkpoint directory (default: the built-in demo model)")
    g.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="compute dtype (default: the checkpoint's)")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded requests' generators")
    g.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int, default=1,
                   help="tensor-parallel ranks, one process per GPU (attention heads and dense "
                        "MLPs split across them; CPU experts computed once, on rank 0)")
    g.add_argument("--no-fp8-gpu", dest="fp8_gpu", action="store_false",
                   help="fp8 checkpoints: dequantize the dense layers at load instead of keeping "
                        "them in fp8 on a GPU with fp8 matmuls (routed experts are always "
                        "dequantized)")
    g = p.add_argument_group("memory and batching")
    g.add_argument("--max-running-requests", type=int, default=64)
    g.add_argument("--max-total-tokens", type=int, default=None, help="KV cache size in tokens")
    g.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int, default=None)
    g.add_argument("--chunked-prefill-size", type=int, default=2048, help="token budget of one step")
    g.add_argument("--disable-cuda-graph", action="store_true",
                   help="decode steps run eagerly instead of replaying CUDA graphs")
    g.add_argument("--cuda-graph-max-bs", type=int, default=32,
                   help="largest decode batch replayed as a CUDA graph")
    g.add_argument("--disable-torch-compile", action="store_true",
                   help="CUDA graph steps: no torch.compile of attention and routing")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="start each step only after the last one's outputs went out, instead of "
                        "producing them while the next step runs")
    g = p.add_argument_group("CPU experts")
    g.add_argument("--kt-weight-format", default="auto", choices=[f.value for f in WeightFormat],
                   help="storage of CPU-resident experts (auto: the checkpoint's own dtype)")
    g.add_argument("--kt-cpuinfer", "--kt-num-cpu-threads", dest="kt_num_cpu_threads", type=int,
                   default=None, help="CPU expert worker threads (default: physical cores)")
    g.add_argument("--kt-prefill-move-experts", action="store_true",
                   help="in large prefill chunks, copy a CPU expert to the GPU for the call when "
                        "that is faster than computing it on the CPU (costs measured at start-up)")
    g = p.add_argument_group("expert placement")
    g.add_argument("--kt-num-gpu-experts", type=int, default=None, help="GPU experts per MoE layer: N in each layer with uniform; "
                        "N x layers in all with the other strategies")
    g.add_argument("--kt-gpu-experts-ratio", type=float, default=None,
                   help="share of all routed experts on the GPU, 0.0-1.0 (overrides the count)")
    g.add_argument("--kt-expert-placement-strategy", default="uniform",
                   choices=[s.value for s in PlacementStrategy])
    g.add_argument("--init-expert-location", default=None, help="activation statistics file (.pt)")
    g.add_argument("--kt-enable-dynamic-expert-update", action="store_true")
    g.add_argument("--kt-gpu-prefill-token-threshold", type=int, default=None)
    g = p.add_argument_group("expert distribution recorder")
    g.add_argument("--expert-distribution-recorder-mode", default=None,
                   choices=list(RECORDER_MODES))
    g.add_argument("--record-kt-gpu-expert-distribution", action="store_true")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    from ktengine.config import (
        CacheConfig,
        EngineConfig,
        MoEConfig,
        ParallelConfig,
        PlacementConfig,
        RecorderConfig,
        SchedulerConfig,
    )

    for name in ("max_running_requests", "chunked_prefill_size"):
        if getattr(args, name) < 1:
            raise KtengineError(f"--{name.replace('_', '-')} must be at least 1")
    if args.tp_size < 1:
        raise KtengineError(f"--tp-size must be at least 1, got {args.tp_size}")
    if args.cuda_graph_max_bs < 1:
        raise KtengineError(f"--cuda-graph-max-bs must be at least 1, got {args.cuda_graph_max_bs}")
    threads = args.kt_num_cpu_threads
    if threads is not None and not 1 <= threads <= MAX_CPU_THREADS:  # checked before the slow load
        raise KtengineError(f"--kt-cpuinfer must be between 1 and {MAX_CPU_THREADS}, got {threads}")
    for name in ("max_total_tokens", "max_model_len"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            raise KtengineError(f"--{name.replace('_', '-')} must be at least 2")
    return EngineConfig(
        model=args.model,
        dtype=None if args.dtype in (None, "auto") else args.dtype,
        device=args.device,
        seed=args.seed,
        served_model_name=getattr(args, "served_model_name", None),
        cache=CacheConfig(max_total_tokens=args.max_total_tokens, max_model_len=args.max_model_len),
        scheduler=SchedulerConfig(max_running_requests=args.max_running_requests,
                                  chunked_prefill_size=args.chunked_prefill_size),
        moe=MoEConfig(weight_format=WeightFormat(args.kt_weight_format),
                      num_cpu_threads=args.kt_num_cpu_threads,
                      prefill_move=args.kt_prefill_move_experts),
        placement=PlacementConfig(
            strategy=PlacementStrategy(args.kt_expert_placement_strategy),
            num_gpu_experts=args.kt_num_gpu_experts,
            gpu_experts_ratio=args.kt_gpu_experts_ratio,
            init_expert_location=args.init_expert_location,
            dynamic_update=args.kt_enable_dynamic_expert_update,
            gpu_prefill_token_threshold=args.kt_gpu_prefill_token_threshold,
        ),
        recorder=RecorderConfig(mode=args.expert_distribution_recorder_mode,
                                record_gpu_masks=args.record_kt_gpu_expert_distribution),
        parallel=ParallelConfig(tp_size=args.tp_size),
        fp8_gpu=args.fp8_gpu,
        disable_cuda_graph=args.disable_cuda_graph,
        cuda_graph_max_bs=args.cuda_graph_max_bs,
        disable_torch_compile=args.disable_torch_compile,
        disable_overlap_schedule=args.disable_overlap_schedule,
    )


def _cmd_version(args: argparse.Namespace) -> int:
    import torch

    import ktengine
    import ktengine_ext

    print(f"ktengine {ktengine.__version__}")
    print(f"torch {torch.__version__}")
    if torch.cuda.is_available():
        print(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA: not available")
    print("CPU instruction sets: " + (" ".join(ktengine_ext.instruction_sets()) or "none beyond x86-64"))
    return 0


def _parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise KtengineError(f"--prompt-token-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise KtengineError("--prompt-token-ids is empty")
    return ids


def _cmd_generate(args: argparse.Namespace) -> int:
    from ktengine.engine import AsyncEngine, collect
    from ktengine.request import SamplingError, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, ignore_eos=args.ignore_eos,
        stop=args.stop or [], logprobs=0,
    )
    try:
        params.validate()
    except SamplingError as exc:
        raise KtengineError(f"--{exc.param.replace('_', '-')}: {exc}") from None
    config = engine_config_from_args(args)
    given_ids = _parse_token_ids(args.prompt_token_ids) if args.prompt_token_ids is not None else None

    async def run() -> int:
        engine = AsyncEngine(config, progress=not args.json)
        try:
            if given_ids is not None:
                ids = given_ids
            elif args.chat:
                ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
            else:
                ids = engine.tokenizer.encode(args.prompt)
            try:
                stream = engine.generate(ids, params)
            except SamplingError as exc:
                raise KtengineError(str(exc)) from None
            if args.json:
                out = await collect(stream)
                print(json.dumps({
                    "prompt_token_ids": ids, "token_ids": out.token_ids, "text": out.text,
                    "logprobs": out.delta_logprobs, "finish_reason": out.finish_reason.value,
                }, ensure_ascii=False))
            else:
                async for out in stream:
                    sys.stdout.write(out.delta_text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        finally:
            await engine.shutdown()
        return 0

    return asyncio.run(run())


def _cmd_serve(args: argparse.Namespace) -> int:
    from ktengine.server.app import run_server

    return run_server(args, engine_config_from_args(args))


def _cmd_chat(args: argparse.Namespace) -> int:
    from ktengine.chat import run_chat

    return run_chat(args)


def _cmd_placement(args: argparse.Namespace) -> int:
    from ktengine.moe.placement_cli import print_placement

    return print_placement(args, engine_config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktengine", description="Hybrid CPU-GPU MoE inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("version", help="versions and the CPU instruction sets found")
    p.set_defaults(func=_cmd_version)

    p = sub.add_parser("generate", help="generate text offline from one prompt")
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-token-ids", help="comma-separated prompt token ids")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("chat", help="interactive chat with a running server")
    p.add_argument("--url", default="http://localhost:30000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--model", default=None, help="model name to ask for (default: the server's)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("placement", help="print the GPU expert placement without loading weights")
    add_engine_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_placement)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=env.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if getattr(args, "json", False):
        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return args.func(args) or 0
    except KtengineError as exc:
        print(f"ktengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
