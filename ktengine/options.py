"""The enumerated choices of ktengine's options, free of heavy imports (the CLI parser uses
them before it knows whether torch is needed)."""
from __future__ import annotations

import enum


class WeightFormat(str, enum.Enum):
    """How CPU-resident experts are stored; AUTO keeps the checkpoint's own dtype (exact path)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"


class PlacementStrategy(str, enum.Enum):
    UNIFORM = "uniform"
    FREQUENCY = "frequency"
    FRONT_LOADING = "front-loading"
    RANDOM = "random"


RECORDER_MODES = ("stat", "stat_approx", "per_pass", "per_token")

MAX_CPU_THREADS = 1024  # CPU expert worker threads (--kt-cpuinfer)
