"""What every causal LM of the zoo shares: the forward contract, logits, and checkpoint-name handling.

A model is built from a `ModelConfig` and a `MoeContext` (which experts this rank holds, which dispatcher and
runner to use) and knows nothing else about devices or parallelism.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from pd.engine.forward_batch import ForwardBatch
from pd.moe.layer import FusedMoE

# Per-expert checkpoint names (Mixtral's w1/w3/w2 and everyone else's gate/up/down) and the fused layout.
_EXPERT = re.compile(
    r"^(?P<layer>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight(?P<scale>_scale_inv)?$"
)
_FUSED_EXPERTS = re.compile(r"^(?P<layer>.+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<proj>gate_up_proj|down_proj)$")
_EXPERT_PARAMS = ("w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv")
_SHARD = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


class CausalLM(nn.Module):
    """Base of every model: subclasses set `self.model` (embed_tokens, layers, norm) and `self.lm_head`."""

    model: nn.Module
    lm_head: nn.Linear

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Runs the decoder on the batch's new tokens: -> final hidden states [T, hidden]."""
        raise NotImplementedError

    def forward_two(self, first: ForwardBatch, second: ForwardBatch) -> torch.Tensor:
        """Two-batch overlap: forward of two micro-batches interleaved layer by layer (DecoderModel.forward_two)
        -> hidden states [T1 + T2, hidden], the same as forward of the whole batch."""
        return self.model.forward_two(first, second)  # type: ignore[operator]

    def kv_layout(self) -> list[tuple[int, int]]:
        """(heads, dim) of each per-token KV buffer of one layer, on this rank."""
        raise NotImplementedError

    def kv_heads(self) -> tuple[int, int, int]:
        """(first, count, total): the KV heads this rank caches in every buffer of kv_layout, out of the model's
        total (the same range for each buffer; a latent cache is one head every rank holds whole)."""
        return 0, 1, 1

    @property
    def num_layers(self) -> int:
        return len(self.model.layers)  # type: ignore[arg-type]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] in the model dtype. Not widened to float32 here: a greedy batch
        only takes the argmax, which the widening cannot change (exact and order-preserving), and at batch 64 the
        widening alone was ~1% of a decode step (a 39 MB write); sampling widens the rows it draws from."""
        return self.lm_head(hidden)

    # ---- checkpoint loading (see pd.models.loader) ----
    def _moe_of(self, layer_prefix: str) -> FusedMoE | None:
        try:
            layer = self.get_submodule(layer_prefix)
        except AttributeError:
            return None
        return next((m for m in layer.modules() if isinstance(m, FusedMoE)), None)

    def _expert_progress(self, moe: FusedMoE) -> dict[object, object]:
        """Loading state of one FusedMoE: (expert, shard) keys copied so far, fused halves awaiting their pair."""
        progress: dict[int, dict[object, object]] = self.__dict__.setdefault("_expert_load_progress", {})
        return progress.setdefault(id(moe), {})

    def load_special(self, name: str, tensor: torch.Tensor) -> bool:
        if m := _EXPERT.match(name):
            moe = self._moe_of(m["layer"])
            if moe is not None:
                expert, shard = int(m["expert"]), _SHARD[m["proj"]]
                # Progress keys: (expert, shard) for a weight, (expert, shard, "scale") for its FP8 scales.
                key = (expert, shard, "scale") if m["scale"] else (expert, shard)
                if moe.load_expert_weight(name, expert, shard, tensor, scale_inv=bool(m["scale"])):
                    self._expert_progress(moe)[key] = True
                return True
        if m := _FUSED_EXPERTS.match(name):
            moe = self._moe_of(m["layer"])
            if moe is not None:
                # The two fused tensors arrive one at a time; FusedMoE.load_fused takes both at once.
                progress = self._expert_progress(moe)
                progress["gate_up" if m["proj"] == "gate_up_proj" else "down"] = tensor
                if "gate_up" in progress and "down" in progress:
                    prefix = name.rpartition(".")[0]
                    moe.load_fused(progress.pop("gate_up"), progress.pop("down"), prefix=prefix)  # type: ignore[arg-type]
                    progress["fused"] = True
                return True
        return False

    def ignore_weight(self, name: str) -> bool:
        return "rotary_emb.inv_freq" in name

    def param_loaded_specially(self, param_name: str) -> bool:
        module_name, _, attr = param_name.rpartition(".")
        module = self.get_submodule(module_name)
        if not isinstance(module, FusedMoE) or attr not in _EXPERT_PARAMS:
            return False
        progress = self._expert_progress(module)
        key_len = 3 if attr.endswith("_scale_inv") else 2
        shards = sum(1 for key in progress if isinstance(key, tuple) and len(key) == key_len)
        return "fused" in progress or shards == 3 * module.num_local_logical_experts
