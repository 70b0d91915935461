"""Zero2LLM model package: config, the handwritten decoder, and KV-cached generation."""

from .config import PRESETS, ModelConfig, config_from_preset
from .generate import generate, sample_next_token
from .model import KVCache, ModelOutput, Transformer, load_balancing_loss

__all__ = [
    "PRESETS",
    "KVCache",
    "ModelConfig",
    "ModelOutput",
    "Transformer",
    "config_from_preset",
    "generate",
    "load_balancing_loss",
    "sample_next_token",
]
