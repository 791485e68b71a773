"""Frozen configuration dataclasses; each subsystem receives only its own section.

The Hugging Face config.json is converted once, at the boundary, by ModelConfig.from_hf.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from ktengine.errors import ConfigError
from ktengine.options import PlacementStrategy, WeightFormat

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ConfigError(f"unsupported dtype {name!r} (expected one of float32, bfloat16, float16)")
    return _DTYPES[key]


class QKNorm(str, enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # RMSNorm over head_dim (Qwen3-MoE)
    FULL = "full"  # RMSNorm over the whole projection (OLMoE)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    partial_rotary_factor: float = 1.0


class LayerType(str, enum.Enum):
    """How a hidden layer mixes tokens."""

    FULL_ATTENTION = "full_attention"  # softmax attention over the paged KV cache
    LINEAR_ATTENTION = "linear_attention"  # Gated DeltaNet over a per-request recurrent state


@dataclass(frozen=True)
class LinearAttentionConfig:
    """Shape of the Gated DeltaNet layers (Qwen3-Next's linear attention)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel_size: int = 4

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal convolution: q, k and v side by side."""
        return 2 * self.key_dim + self.value_dim


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP layers
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    moe_layers: tuple[bool, ...]  # per hidden layer: True if its MLP is a routed MoE
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    norm_topk_prob: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v projections
    o_proj_bias: bool = False
    qk_norm: QKNorm = QKNorm.NONE
    clip_qkv: float | None = None
    sliding_window: int | None = None
    dtype: torch.dtype = torch.bfloat16
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    layer_types: tuple[LayerType, ...] = ()  # per hidden layer; () = full attention everywhere
    linear_attention: LinearAttentionConfig | None = None  # set when any layer is linear

    def layer_type(self, layer: int) -> LayerType:
        return self.layer_types[layer] if self.layer_types else LayerType.FULL_ATTENTION

    @property
    def kv_layer_ids(self) -> list[int]:
        """Hidden layers that keep K/V entries in the paged cache, in order."""
        return [i for i in range(self.num_layers) if self.layer_type(i) is LayerType.FULL_ATTENTION]

    @property
    def linear_layer_ids(self) -> list[int]:
        """Hidden layers that keep a per-request recurrent state instead, in order."""
        return [i for i in range(self.num_layers) if self.layer_type(i) is LayerType.LINEAR_ATTENTION]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def moe_layer_ids(self) -> list[int]:
        """Hidden-layer index of each MoE layer, in order."""
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one routed expert's gate, up and down weights in the model dtype."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 3 * self.hidden_size * self.moe_intermediate_size * elem

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        from ktengine.model.registry import spec_for

        if not isinstance(hf, dict):
            raise ConfigError("config.json must hold a JSON object")
        try:
            config = spec_for(hf).config_from_hf(hf)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:  # e.g. "num_hidden_layers": "two"
            raise ConfigError(f"config.json has a value of the wrong kind: {exc}") from None
        config.check()
        return config

    def check(self) -> None:
        """Raises ConfigError for a shape the model cannot run."""
        if any(self.moe_layers) and not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be between 1 and the {self.num_experts} "
                              f"experts, got {self.top_k}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from max_total_tokens
    max_total_tokens: int | None = None  # None: max_model_len × max_running_requests, capped
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_state_slots: int | None = None  # linear-attention models: None = max_running_requests


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_requests: int = 64
    chunked_prefill_size: int = 2048  # token budget of one step
    max_waiting_requests: int = 4096


@dataclass(frozen=True)
class MoEConfig:
    weight_format: WeightFormat = WeightFormat.AUTO
    num_cpu_threads: int | None = None
    cpu_kernel_path: str | None = None  # None: env / auto
    group_size: int = 64  # int4 quantization group
    prefill_move: bool = False  # move-or-compute per expert for large prefill chunks


@dataclass(frozen=True)
class PlacementConfig:
    strategy: PlacementStrategy = PlacementStrategy.UNIFORM
    num_gpu_experts: int | None = None  # per MoE layer
    gpu_experts_ratio: float | None = None  # share of all routed experts; overrides num_gpu_experts
    init_expert_location: str | None = None
    dynamic_update: bool = False
    gpu_prefill_token_threshold: int | None = None


@dataclass(frozen=True)
class RecorderConfig:
    mode: str | None = None  # stat | stat_approx | per_pass | per_token
    record_gpu_masks: bool = False


class CommBackend(str, enum.Enum):
    """torch.distributed backend of the tensor-parallel group."""

    NCCL = "nccl"  # CUDA devices
    GLOO = "gloo"  # CPU (tests and CPU-only runs)


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1  # tensor-parallel ranks, one process each (rank r uses cuda:r on CUDA)
    backend: CommBackend | None = None  # None: nccl on CUDA, gloo otherwise
    timeout_s: float = 600.0  # longest a collective waits for the other ranks in one step


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; `model` None means the built-in demo model."""

    model: str | None = None
    dtype: str | None = None  # None: the checkpoint's dtype
    device: str | None = None  # None: cuda if available, else cpu
    seed: int = 0
    served_model_name: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    recorder: RecorderConfig = field(default_factory=RecorderConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # fp8 checkpoints: dense layers keep their fp8 weights and multiply in fp8 on a GPU that
    # can (model/fp8_linear.py); False dequantizes them to the compute dtype at load instead.
    fp8_gpu: bool = True
    # Decode steps replay CUDA graphs captured per batch size (up to cuda_graph_max_bs) on a
    # CUDA device, the CPU experts inside them as host functions; eager mode otherwise.
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = 32
    # with CUDA graphs, the MoE layers' attention and routing go through torch.compile (fused
    # elementwise kernels; compiled once per process, at the first capture)
    disable_torch_compile: bool = False
    # the next step is scheduled and started as soon as a step's tokens are sampled; its
    # outputs (detokenizing, stop strings, streams) are produced while that step runs
    disable_overlap_schedule: bool = False
