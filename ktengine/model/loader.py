"""Loading a Hugging Face checkpoint directory into MoEForCausalLM.

Safetensors files are opened memory-mapped and copied tensor by tensor into the model's
own (already allocated) parameters, so peak memory stays near the model's size. Routed
experts load from either spelling: one tensor per expert (`experts.E.gate_proj.weight`,
Mixtral's `experts.E.w1.weight`) or the fused stacks transformers 5 keeps in memory
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).

An fp8 checkpoint is dequantized as it is read (model/fp8.py), except on a CUDA device with
an fp8 matmul backend (model/fp8_linear.py) and a bf16 model: there every dense `Linear`
whose checkpoint weight is fp8 and whose dimensions are multiples of 128 becomes an
`Fp8Linear` that keeps the weight and its scales as stored. Routed experts, and layers of
other shapes, are dequantized all the same.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ktengine.config import ModelConfig, parse_dtype
from ktengine.errors import ModelLoadError
from ktengine.model.decoder import MoEForCausalLM, RoutedExperts
from ktengine.model.fp8 import SCALE_SUFFIX, Fp8Config, Fp8Reader, fp8_config_from_hf
from ktengine.model.fp8_linear import Fp8Linear, fits_fp8, fp8_backend
from ktengine.model.hf_config import read_json_object
from ktengine.model.layers import Linear
from ktengine.model.registry import ArchSpec, spec_for

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(\w+)\.experts\.(gate_up_proj|down_proj)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq")
_MTP = re.compile(r"(^mtp\.|\.mtp\.)")  # multi-token-prediction heads: not used for decoding


def read_hf_config(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory not found: {model_dir}")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path} not found")
    return read_json_object(path)


def load_model_config(model_dir: Path, dtype: str | None = None) -> ModelConfig:
    config = ModelConfig.from_hf(read_hf_config(model_dir))
    if dtype is not None:
        from dataclasses import replace

        config = replace(config, dtype=parse_dtype(dtype))
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            files = sorted({model_dir / f for f in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names missing file(s): {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {model_dir}")
    return files


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc} (a truncated or corrupted file?)") from None


def _read_tensor(handle, name: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read tensor {name} from {path}: {exc}") from None


def _dense_target(name: str, spec: ArchSpec) -> str:
    """The model's parameter name for a checkpoint tensor that is not a routed expert."""
    return name.replace(f".{spec.moe_prefix}.", ".mlp.")


class _Assigner:
    """Maps checkpoint tensor names onto the model's parameters and copies them in."""

    def __init__(self, model: MoEForCausalLM, spec: ArchSpec) -> None:
        self.params = dict(model.named_parameters())
        self.spec = spec
        self.config = model.config
        self.filled: set[str] = set()
        self.num_mtp = 0  # multi-token-prediction tensors skipped
        self.expert_filled: dict[str, set[int]] = {}
        gate, up, down = spec.expert_names
        self.expert_param = {gate: "gate_proj", up: "up_proj", down: "down_proj"}

    def assign(self, name: str, tensor_fn) -> bool:
        """Copies one checkpoint tensor; False if the name means nothing to this model."""
        if _IGNORED.search(name):
            return True
        if _MTP.search(name):
            self.num_mtp += 1
            return True
        m = _PER_EXPERT.match(name)
        if m:
            layer, _, expert, kind = int(m[1]), m[2], int(m[3]), m[4]
            if kind not in self.expert_param:
                return False
            target = f"model.layers.{layer}.mlp.experts.{self.expert_param[kind]}"
            param = self._param(target, name)
            if expert >= param.shape[0]:
                raise ModelLoadError(f"{name}: expert {expert} out of range ({param.shape[0]} experts)")
            self._copy(param[expert], tensor_fn(), name)
            self.expert_filled.setdefault(target, set()).add(expert)
            return True
        m = _FUSED.match(name)
        if m:
            prefix = f"model.layers.{m[1]}.mlp.experts"
            tensor = tensor_fn()
            if m[3] == "down_proj":
                self._copy_full(f"{prefix}.down_proj", tensor, name)
            else:
                inter = self.config.moe_intermediate_size
                if tensor.dim() != 3 or tensor.shape[1] != 2 * inter:
                    raise ModelLoadError(
                        f"{name} has shape {tuple(tensor.shape)}, expected [E, {2 * inter}, H]"
                    )
                self._copy_full(f"{prefix}.gate_proj", tensor[:, :inter], name)
                self._copy_full(f"{prefix}.up_proj", tensor[:, inter:], name)
            return True
        target = _dense_target(name, self.spec)
        if target not in self.params:
            return False
        self._copy_full(target, tensor_fn(), name)
        return True

    def _param(self, target: str, source: str) -> torch.nn.Parameter:
        if target not in self.params:
            raise ModelLoadError(f"checkpoint tensor {source} does not fit this model's config")
        return self.params[target]

    def _copy_full(self, target: str, tensor: torch.Tensor, source: str) -> None:
        self._copy(self._param(target, source), tensor, source)
        self.filled.add(target)

    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, source: str) -> None:
        if tuple(dst.shape) != tuple(src.shape):
            raise ModelLoadError(
                f"tensor {source} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
            )
        dst.copy_(src)

    def missing(self) -> list[str]:
        missing = []
        for name, param in self.params.items():
            if name in self.filled:
                continue
            if name in self.expert_filled and len(self.expert_filled[name]) == param.shape[0]:
                continue
            if name.endswith((".experts.gate_proj", ".experts.up_proj", ".experts.down_proj")):
                got = self.expert_filled.get(name, set())
                lost = sorted(set(range(param.shape[0])) - got)
                missing.append(f"{name} (experts {lost[:5]}{'...' if len(lost) > 5 else ''})")
                continue
            missing.append(name)
        return missing


def _to_device_keeping_experts_on_host(model: MoEForCausalLM, device: torch.device) -> None:
    """Moves everything but the routed experts' stacks to `device`.

    The experts are most of an MoE model's bytes and the GPU has room for only a chosen few:
    they stay in host memory, where the hybrid executor packs them for the CPU and copies the
    chosen ones into GPU slots.
    """
    if device.type == "cpu":
        return
    held = []
    for module in model.modules():
        if isinstance(module, RoutedExperts):
            held.append((module, module.gate_proj, module.up_proj, module.down_proj))
            module.gate_proj = module.up_proj = module.down_proj = None
    model.to(device)
    for module, gate, up, down in held:
        module.gate_proj, module.up_proj, module.down_proj = gate, up, down


def _keep_fp8_layers(
    model: MoEForCausalLM, spec: ArchSpec, names: list[str], quant: Fp8Config | None,
    dtype: torch.dtype, device: torch.device, fp8_gpu: bool,
) -> frozenset[str]:
    """Swaps in an Fp8Linear for each dense Linear that can keep its fp8 checkpoint weight on
    `device`; returns the checkpoint names of those weights (the rest are dequantized)."""
    if quant is None:
        return frozenset()
    what = f"fp8 checkpoint ({quant.block_size[0]}x{quant.block_size[1]} blocks)"
    to = str(dtype).replace("torch.", "")
    if not fp8_gpu or dtype != torch.bfloat16:
        why = "fp8_gpu is off" if not fp8_gpu else "fp8 layers compute in bfloat16 only"
        log.info("%s: dequantizing every weight to %s at load (%s)", what, to, why)
        return frozenset()
    backend = fp8_backend(device)  # None off CUDA; logs its choice
    if backend is None:
        log.info("%s: dequantizing every weight to %s at load (no fp8 matmuls on %s)", what,
                 to, device)
        return frozenset()
    kept, misfit = set(), []
    for scale_name in names:
        name = scale_name.removesuffix(SCALE_SUFFIX)
        if name == scale_name or not name.endswith(".weight"):
            continue  # not a scale, or a fused expert stack's
        parent_name, _, child = _dense_target(name, spec)[: -len(".weight")].rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:  # a routed expert (experts.E.*) or nothing this model has
            continue
        layer = getattr(parent, child, None)
        if type(layer) is not Linear:
            continue
        out_features, in_features = layer.weight.shape
        if not fits_fp8(out_features, in_features, quant.block_size):
            misfit.append(name)
            continue
        setattr(parent, child, Fp8Linear(in_features, out_features, layer.bias is not None,
                                         dtype, backend))
        kept.add(name)
    log.info("%s: %d dense layers stay fp8 (%s); routed experts%s dequantized to %s", what,
             len(kept), backend.value,
             f" and {len(misfit)} layers of other shapes (e.g. {misfit[0]})" if misfit else "",
             to)
    return frozenset(kept)


def load_model(
    model_dir: Path, config: ModelConfig, device: torch.device, progress: bool = True,
    fp8_gpu: bool = True,
) -> MoEForCausalLM:
    """Fills the model from the checkpoint's safetensors files: dense weights end up on
    `device`, routed experts in host memory. `fp8_gpu` False dequantizes an fp8 checkpoint
    even where the device could multiply in fp8."""
    model_dir, device = Path(model_dir), torch.device(device)
    hf = read_hf_config(model_dir)
    spec = spec_for(hf)
    quant = fp8_config_from_hf(hf)  # a bad quantization_config fails before the slow part
    model = (spec.model_class or MoEForCausalLM)(config)  # on the host; moved below
    files = safetensors_files(model_dir)
    unexpected: list[str] = []
    total = 0
    handles = [_open_safetensors(f) for f in files]
    tensors = {n: (lambda h=h, n=n, f=f: _read_tensor(h, n, f))
               for h, f in zip(handles, files, strict=True) for n in h.keys()}  # noqa: SIM118 (a handle is not iterable)
    keep_fp8 = _keep_fp8_layers(model, spec, list(tensors), quant, config.dtype, device, fp8_gpu)
    assigner = _Assigner(model, spec)  # after the swap: it sees the Fp8Linear parameters
    reader = Fp8Reader(quant, tensors, config.dtype, keep_fp8)
    total = len(tensors)
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress or total < 64)
    with torch.no_grad():
        try:
            for name in tensors:
                if not reader.is_consumed(name) and not assigner.assign(name, lambda n=name: reader.read(n)):
                    unexpected.append(name)
                bar.update(1)
        finally:  # an error below prints on its own line, not after the bar
            bar.close()
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
            assigner.filled.add("lm_head.weight")
    if assigner.num_mtp:
        log.info("skipped %d multi-token-prediction tensor(s) (mtp.*): ktengine does not use them",
                 assigner.num_mtp)
    if unexpected:
        log.warning("ignored %d checkpoint tensor(s) this model does not use, e.g. %s", len(unexpected), unexpected[0])
    missing = assigner.missing()
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelLoadError(f"checkpoint {model_dir} lacks tensor {missing[0]}{more}")
    _to_device_keeping_experts_on_host(model, device)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.prepare()
    return model.eval()
