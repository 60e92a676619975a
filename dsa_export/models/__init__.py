"""Config (from HF config.json), the eager model, checkpoint reading and writing, presets."""

from dsa_export.models.checkpoint import init_checkpoint, load_checkpoint
from dsa_export.models.config import DSAConfig, load_config
from dsa_export.models.cache import KVCache
from dsa_export.models.model import DSAForCausalLM
from dsa_export.models.presets import PRESETS, get_preset

__all__ = ["DSAConfig", "DSAForCausalLM", "KVCache", "PRESETS", "get_preset", "init_checkpoint", "load_checkpoint",
           "load_config"]
