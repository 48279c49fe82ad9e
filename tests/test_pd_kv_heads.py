"""PD between instances whose ranks cache different shares of a GQA model's 4 KV heads: both instances shard them over
their tensor-parallel ranks, every prefill rank writes its heads of a room straight into the decode ranks that cache
them (whole pages where the ranges match, runs of heads where they do not), and each decode rank receives only its
heads. Greedy tokens equal the unified `pd serve`'s (the Reference in tests.test_pd_e2e) and every page comes back on
both sides."""

from __future__ import annotations

import httpx
import pytest

from tests.test_pd_e2e import _pd_equals_pd_serve
from tests.tiny_checkpoints import CONFIGS

ARCH = "qwen3_moe_gqa"
KV_HEADS = CONFIGS[ARCH]["num_key_value_heads"]


# Equal TP sizes on both sides (rank to rank, whole pages) run in tests/test_pd_e2e.py (TP_SPLITS), and a one-rank
# prefill into decode TP 2 and 4 in tests/test_pd_tp_kv.py.
@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (2, 4)])
def test_pd_across_tp_sizes_with_sharded_kv_heads_equals_pd_serve(prefill_tp: int, decode_tp: int,
                                                                  pd_references) -> None:
    with _pd_equals_pd_serve(pd_references(ARCH), 8, 16, 1, 1, prefill_args=("--tp", str(prefill_tp)),
                             decode_args=("--tp", str(decode_tp))) as (prefill, decode):
        heads = {url: httpx.get(f"{url}/get_server_info").json()["kv_heads_per_rank"] for url in (prefill, decode)}
    assert heads == {prefill: KV_HEADS // prefill_tp, decode: KV_HEADS // decode_tp}
