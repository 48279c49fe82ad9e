"""Tensor-parallel decode instances receive their KV straight from prefill: every rank's pages land in its own
memory through the transfer engine, so no rank issues a collective for received KV. Greedy tokens equal the
unified `pd serve`'s (the Reference in tests.test_pd_e2e), and every rank's collectives are counted from outside
(tests/collectives_site: each torch.distributed call of a decode process is logged to a file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.test_pd_e2e import _pd_equals_pd_serve

SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "collectives_site")
# What a decode leader tells its followers (pd.dist.step_sync); a KV broadcast would be another op or float data.
STEP_OPS = {"forward", "idle", "ping", "stop"}


def _collective_env(log_dir: Path) -> dict[str, str]:
    return {"PD_COLLECTIVE_LOG": str(log_dir),
            "PYTHONPATH": os.pathsep.join(p for p in (SITE, os.environ.get("PYTHONPATH", "")) if p)}


def _records(log_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each logging process's collectives, in call order."""
    return {f.name: [json.loads(line) for line in f.read_text().splitlines()] for f in sorted(log_dir.iterdir())}


@pytest.mark.parametrize("decode_tp", [2, 4])
def test_decode_ranks_receive_their_own_kv_with_no_collective_and_equal_pd_serve(decode_tp: int, pd_references,
                                                                                tmp_path: Path) -> None:
    log_dir = tmp_path / "collectives"
    log_dir.mkdir()
    with _pd_equals_pd_serve(pd_references("qwen3_moe"), 8, 16, 1, 1, decode_args=("--tp", str(decode_tp)),
                             decode_env=_collective_env(log_dir)):
        pass
    ranks = _records(log_dir)
    assert len(ranks) == decode_tp, sorted(ranks)  # the rank processes (the HTTP front issues none)
    for name, calls in ranks.items():
        ops = [c["op"] for c in calls if c["fn"] == "broadcast" and c["op"] is not None]
        assert ops.count("forward") >= 16, (name, ops)  # the log saw this rank run the requests' forwards
        assert set(ops) <= STEP_OPS, (name, set(ops) - STEP_OPS)
        data = [c for c in calls if c["fn"] == "broadcast" and c["dtype"] not in ("int64", "uint8")]
        assert not data, (name, data[:3])  # KV contents broadcast from the leader
        first_forward = next(i for i, c in enumerate(calls) if c["op"] == "forward")
        late = [c for c in calls[first_forward:] if c["fn"] not in ("broadcast", "all_reduce")]
        assert not late, (name, late[:3])  # only step messages and the forwards' all-reduces once serving
