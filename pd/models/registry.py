"""Architecture name (config.json `architectures[0]`) -> model class, imported lazily."""

from __future__ import annotations

import importlib

from pd.models.config import ModelConfigError

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("pd.models.llama", "LlamaForCausalLM"),
    "MixtralForCausalLM": ("pd.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("pd.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("pd.models.qwen3_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("pd.models.deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("pd.models.deepseek", "DeepseekV3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type:
    if architecture not in _MODELS:
        raise ModelConfigError(
            f"unknown architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module, name = _MODELS[architecture]
    return getattr(importlib.import_module(module), name)
