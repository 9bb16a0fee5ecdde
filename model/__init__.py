"""Galactica model: config, megatron-core tensor-parallel transformer, process groups, HF export.

`GalacticaLM` is imported lazily so that `model.config` stays cheap to import (megatron-core and
torch.distributed take seconds to import).
"""
from model.config import GalacticaConfig

__all__ = ["GalacticaConfig", "GalacticaLM"]


def __getattr__(name: str):
    if name == "GalacticaLM":
        from model.transformer import GalacticaLM
        return GalacticaLM
    raise AttributeError(f"module 'model' has no attribute {name!r}")
