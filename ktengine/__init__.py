"""ktengine: hybrid CPU-GPU inference for Mixture-of-Experts language models.

The public API: AsyncEngine, EngineConfig, SamplingParams, __version__.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["AsyncEngine", "EngineConfig", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from ktengine.config import EngineConfig
    from ktengine.engine import AsyncEngine
    from ktengine.request import SamplingParams


def __getattr__(name: str):
    # Lazy, so `ktengine version` and the client do not pay for importing the engine.
    if name == "AsyncEngine":
        from ktengine.engine import AsyncEngine

        return AsyncEngine
    if name == "EngineConfig":
        from ktengine.config import EngineConfig

        return EngineConfig
    if name == "SamplingParams":
        from ktengine.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ktengine' has no attribute {name!r}")
