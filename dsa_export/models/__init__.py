"""Config (from HF config.json), the eager model, checkpoint reading and writing, presets.

The names below are imported on first use: the command line reads presets and configs without importing torch."""

from importlib import import_module

_EXPORTS = {"DSAConfig": "config", "load_config": "config", "DSAForCausalLM": "model", "KVCache": "cache",
            "PRESETS": "presets", "get_preset": "presets", "load_checkpoint": "checkpoint",
            "init_checkpoint": "init"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dsa_export.models' has no attribute {name!r}")
    return getattr(import_module(f"dsa_export.models.{_EXPORTS[name]}"), name)
