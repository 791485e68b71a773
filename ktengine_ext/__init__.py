"""ktengine's compiled extension: CPU expert kernels and CPU feature detection."""
from ktengine_ext._moe import detect_cpu

CPU_FEATURES: dict = detect_cpu()


def instruction_sets() -> list[str]:
    """Names of the usable instruction sets found on this CPU, e.g. ['avx512f', 'amx_bf16']."""
    return [name for name, present in CPU_FEATURES.items() if present]


__all__ = ["CPU_FEATURES", "detect_cpu", "instruction_sets"]
