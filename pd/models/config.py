"""Model configuration: the checkpoint's config.json, read once and normalised.

Hugging Face configs come in two generations: the legacy `rope_theta` + `rope_scaling` keys and the newer
`rope_parameters` dict. `ModelConfig` accepts both and exposes one `rope_parameters` dict with `rope_type`
and `rope_theta` always present, so model code never looks at the raw keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pd.quant.fp8 import Fp8Config


class ModelConfigError(ValueError):
    """The checkpoint's config.json is missing, unreadable or names an unsupported architecture."""


@dataclass(frozen=True)
class ModelConfig:
    """The parsed config.json of a checkpoint. Unknown keys stay reachable through `get`/attribute access."""

    path: str
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_path(cls, model_path: str) -> ModelConfig:
        config_file = os.path.join(model_path, "config.json")
        if not os.path.isfile(config_file):
            raise ModelConfigError(
                f"--model-path {model_path!r} has no config.json (expected a Hugging Face model directory)"
            )
        with open(config_file) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelConfigError(f"{config_file} is not valid JSON: {e}") from e
        return cls(path=model_path, raw=raw)

    def __getattr__(self, name: str) -> Any:
        raw = self.__dict__.get("raw")
        if raw is not None and name in raw:
            return raw[name]
        raise AttributeError(f"model config has no field {name!r}")

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name, default)
        return default if value is None else value

    @property
    def architecture(self) -> str:
        archs = self.raw.get("architectures") or []
        if not archs:
            raise ModelConfigError(f"{self.path}/config.json has no 'architectures' entry")
        return str(archs[0])

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.hidden_size // self.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(self.get("num_key_value_heads", self.num_attention_heads))

    @property
    def max_position_embeddings(self) -> int:
        return int(self.get("max_position_embeddings", 4096))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids from generation_config.json when present (it wins, as in transformers), else config.json."""
        eos: Any = None
        gen_file = os.path.join(self.path, "generation_config.json")
        if os.path.isfile(gen_file):
            with open(gen_file) as f:
                eos = json.load(f).get("eos_token_id")
        if eos is None:
            eos = self.raw.get("eos_token_id")
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list) else (int(eos),)

    @property
    def quantization(self) -> Fp8Config | None:
        """The checkpoint's weight quantization (``quantization_config``): None for unquantized checkpoints.

        Raises:
            ModelConfigError: a quantization other than block-wise FP8 e4m3 with dynamic activation scales.
        """
        qc = self.raw.get("quantization_config")
        if not qc:
            return None
        where = f"{self.path}/config.json quantization_config"
        if qc.get("quant_method") != "fp8":
            raise ModelConfigError(f"{where}: quant_method {qc.get('quant_method')!r} is not supported (only fp8)")
        if qc.get("fmt", "e4m3") != "e4m3" or qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ModelConfigError(f"{where}: only fmt e4m3 with activation_scheme dynamic is supported, got "
                                   f"{qc.get('fmt')!r} / {qc.get('activation_scheme')!r}")  # fmt: skip
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise ModelConfigError(f"{where}: weight_block_size {block!r} is not [rows, cols] (per-tensor FP8 "
                                   "checkpoints are not supported, only block-wise ones)")  # fmt: skip
        skipped = tuple(qc.get("modules_to_not_convert") or ())
        return Fp8Config(block=(block[0], block[1]), modules_to_not_convert=skipped)

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """One dict with at least `rope_type` and `rope_theta`, from either config generation."""
        params: dict[str, Any] = dict(self.raw.get("rope_parameters") or {})
        legacy = self.raw.get("rope_scaling") or {}
        for key, value in legacy.items():
            params.setdefault(key, value)
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", self.raw.get("rope_theta", 10000.0))
        return params
