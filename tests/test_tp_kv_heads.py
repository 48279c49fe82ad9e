"""KV heads sharded over the ranks of a tensor-parallel `pd serve` (gloo on CPU): with a GQA model of 4 KV heads,
each rank caches only its 4 / TP of them (every rank's start-up log names its range; /get_server_info reports the
heads and bytes per rank), and greedy tokens equal the one-process run's."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

from tests.server_process import free_port, healthy_process
from tests.test_parallel_serve import Case
from tests.tiny_checkpoints import CONFIGS

ARCH = "qwen3_moe_gqa"
KV_HEADS, HEAD_DIM, LAYERS = (CONFIGS[ARCH][k] for k in ("num_key_value_heads", "head_dim", "num_hidden_layers"))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    return Case(ARCH, str(tmp_path_factory.mktemp("kv-heads")))


@pytest.mark.parametrize("layout", ["--tp 2", "--tp 4 --ep 4 --moe-a2a-backend torch"])
def test_each_rank_caches_its_share_of_the_kv_heads_and_greedy_tokens_equal_the_one_process_run(
    case: Case, layout: str, tmp_path: Path
) -> None:
    tp = int(layout.split()[1])
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pd", "serve", "--model-path", case.path, "--device", "cpu", "--dtype", "float32",
           "--port", str(port), *case.instance_args, *layout.split()]  # fmt: skip
    with healthy_process(cmd, port, log_path=str(log)) as (url, _):
        info = httpx.get(f"{url}/get_server_info").json()
        got = case.run(url)
    assert got == case.expected, f"seed {case.seed}, {layout}"
    per_rank = KV_HEADS // tp
    logged = re.findall(rf"KV heads \[(\d+), (\d+)\) of {KV_HEADS}", log.read_text())
    assert sorted((int(a), int(b)) for a, b in logged) == [(r * per_rank, (r + 1) * per_rank) for r in range(tp)]
    assert info["kv_heads_per_rank"] == per_rank
    # K and V of every layer, float32, for every token the pool holds
    assert info["kv_bytes_per_rank"] == info["max_total_num_tokens"] * LAYERS * 2 * per_rank * HEAD_DIM * 4
