"""ServerArgs parsing, auto resolution, validation and the `pd` CLI skeleton.

Expected values come from the flag specification (defaults, constraint rules), not from running the parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import launch.cli as cli
import pd.server_args as sa
from launch.cli import main
from pd.server_args import ServerArgs, ServerArgsError

REPO = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks CPU-only resolution")


def parse(argv: str) -> ServerArgs:
    """Parse like `pd serve`, pinning --device cpu unless given so results do not depend on the machine."""
    args = argv.split()
    if "--device" not in args:
        args += ["--device", "cpu"]
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_namespace(parser.parse_args(args))


@no_cuda
def test_defaults_parse_and_auto_resolves_to_cpu_float32() -> None:
    a = ServerArgs.from_cli([])
    assert (a.device, a.dtype, a.torch_dtype) == ("cpu", "float32", torch.float32)
    assert a.is_cpu and not a.is_cuda and a.dist_backend == "gloo"
    assert a.moe_runner_backend == "cpu_packed"  # auto on cpu: oneDNN-packed expert weights
    assert a.served_model_name == "pd-default" and a.uses_default_model and a.tokenizer_path is None
    assert a.max_total_tokens == 65536 and a.mem_fraction_static is None
    assert (a.tp_size, a.ep_size, a.dp_size, a.pp_size, a.nnodes) == (1, 1, 1, 1, 1)
    assert (a.page_size, a.chunked_prefill_size, a.max_running_requests) == (16, 2048, 64)
    assert a.max_prefill_tokens == 16384  # SGLang's default
    assert a.url == "http://127.0.0.1:30000"
    assert sa.not_implemented(a) == []


def test_auto_resolves_to_cuda_bfloat16_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa, "_cuda_available", lambda: True)
    monkeypatch.setattr(sa, "gpu_memory_bytes", lambda device: 141 * 10**9)  # an H200
    a = ServerArgs()
    assert (a.device, a.dtype, a.torch_dtype, a.dist_backend) == ("cuda", "bfloat16", torch.bfloat16, "nccl")
    assert a.mem_fraction_static == 0.85 and a.max_total_tokens is None  # GPU capacity comes from memory later
    assert a.chunked_prefill_size == 8192 and a.piecewise_cuda_graph_tokens[-1] == 8192
    assert ServerArgs(max_total_tokens=4096).chunked_prefill_size == 4096  # a default never breaks a given flag
    assert ServerArgs(chunked_prefill_size=512).chunked_prefill_size == 512


@pytest.mark.parametrize(("gib", "size"), [(None, 2048), (24, 2048), (34.9, 2048), (35, 8192), (80, 8192),
                                           (141e9 / 2**30, 8192), (159.9, 8192), (180, 16384)])  # fmt: skip
def test_chunked_prefill_default_follows_sglang_tiers(gib: float | None, size: int) -> None:
    """SGLang: 2048 on GPUs under 35 GiB (A10, L40, 4090), 8192 under 160 GiB (A100, H100, H200, H20), 16384 on
    larger ones (B200, MI300); off CUDA ours stays 2048."""
    assert sa.default_chunked_prefill_size(None if gib is None else int(gib * 2**30)) == size


def test_auto_resolves_to_npu_when_only_torch_npu_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa, "_cuda_available", lambda: False)
    monkeypatch.setattr(sa, "_npu_available", lambda: True)
    a = ServerArgs()
    assert (a.device, a.dtype, a.dist_backend) == ("npu", "bfloat16", "hccl")


@pytest.mark.parametrize("tp_flag", ["--tp", "--tp-size"])
@pytest.mark.parametrize("ep_flag", ["--ep", "--ep-size"])
def test_parallel_flag_aliases_fill_the_same_field(tp_flag: str, ep_flag: str) -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args([tp_flag, "8", ep_flag, "4", "--model", "/m"])
    assert (ns.tp_size, ns.ep_size, ns.model_path) == (8, 4, "/m")


def test_model_path_derives_served_name_and_tokenizer() -> None:
    a = parse("--model-path /models/Qwen3-30B-A3B/")
    assert a.served_model_name == "Qwen3-30B-A3B" and a.tokenizer_path == "/models/Qwen3-30B-A3B/"
    b = parse("--model-path /m/x --served-model-name y --tokenizer-path /t")
    assert (b.served_model_name, b.tokenizer_path) == ("y", "/t")


BAD = [
    ("--disaggregation-transfer-timeout 0", "--disaggregation-transfer-timeout must be > 0 seconds"),
    ("--disaggregation-bootstrap-timeout -1", "--disaggregation-bootstrap-timeout must be > 0 seconds"),
    ("--tp 0", "--tp-size must be >= 1"),
    ("--ep 0", "--ep-size must be >= 1"),
    ("--dp-size 0", "--dp-size must be >= 1"),
    ("--pp-size 0", "--pp-size must be >= 1"),
    ("--nnodes 0", "--nnodes must be >= 1"),
    ("--ep 3 --tp 2", "--ep-size (3) must divide --tp-size (2)"),
    ("--tp 4 --ep 3", "--ep-size (3) must divide --tp-size (4)"),
    *[
        (f"--tp 2 --ep 1 --moe-a2a-backend {b}", f"--moe-a2a-backend {b} needs --ep-size == --tp-size")
        for b in ("deepep", "mooncake", "mori", "ascend_fuseep")
    ],
    ("--tp 4 --ep 2 --moe-a2a-backend torch", "--ep-size (2) < --tp-size (4) requires --moe-a2a-backend none"),
    ("--tp 4 --ep 2 --moe-a2a-backend flashinfer", "requires --moe-a2a-backend none"),
    ("--tp 2 --dp-size 2", "--dp-size 2 requires --enable-dp-attention"),
    ("--tp 4 --dp-size 3 --enable-dp-attention", "--dp-size (3) must divide --tp-size (4)"),
    ("--tp 2 --nnodes 2 --node-rank 2 --dist-init-addr h:5000", "--node-rank (2) must be in 0..1"),
    ("--node-rank -1", "--node-rank (-1)"),
    ("--tp 2 --nnodes 2", "--nnodes > 1 requires --dist-init-addr"),
    ("--tp 2 --nnodes 2 --dist-init-addr nohost", "--dist-init-addr must be host:port"),
    ("--dist-init-addr h:99999", "--dist-init-addr must be host:port"),
    ("--tp 3 --nnodes 2 --dist-init-addr h:5000", "--nnodes (2) must divide"),
    ("--page-size 0", "--page-size must be >= 1"),
    ("--chunked-prefill-size 8", "--chunked-prefill-size (8) must be -1 (off) or >= --page-size (16)"),
    ("--chunked-prefill-size 0", "--chunked-prefill-size (0)"),
    ("--max-prefill-tokens 0", "--max-prefill-tokens must be >= 1"),
    ("--prefill-wait-ms -1", "--prefill-wait-ms must be in [0, 1000]"),
    ("--prefill-wait-ms 5000", "--prefill-wait-ms must be in [0, 1000]"),
    ("--max-total-tokens 1024 --chunked-prefill-size 2048",
     "--chunked-prefill-size (2048) must be <= --max-total-tokens (1024)"),
    ("--max-total-tokens 8 --chunked-prefill-size -1", "--max-total-tokens (8) must be >= --page-size (16)"),
    ("--max-running-requests 0", "--max-running-requests must be >= 1"),
    ("--max-queued-requests 0", "--max-queued-requests must be >= 1"),
    ("--context-length 0", "--context-length must be >= 1"),
    ("--mem-fraction-static 1.0", "--mem-fraction-static must be in (0, 1)"),
    ("--mem-fraction-static 0", "--mem-fraction-static must be in (0, 1)"),
    ("--port 0", "--port must be in 1..65535"),
    ("--port 65536", "--port must be in 1..65535"),
    ("--disaggregation-bootstrap-port 70000", "--disaggregation-bootstrap-port must be in 1..65535"),
    ("--tp 2 --ep 2 --moe-a2a-backend ascend_fuseep", "--moe-a2a-backend ascend_fuseep requires --device npu"),
    ("--moe-a2a-backend deepep", "--moe-a2a-backend deepep requires --device cuda"),
    ("--moe-runner-backend triton", "--moe-runner-backend triton requires --device cuda"),
    ("--speculative-moe-runner-backend deep_gemm", "--speculative-moe-runner-backend deep_gemm requires --device"),
    ("--enable-eplb", "--enable-eplb requires --ep-size > 1"),
    ("--ep-num-redundant-experts 4", "--ep-num-redundant-experts > 0 requires --ep-size > 1"),
    ("--ep-num-redundant-experts -1", "--ep-num-redundant-experts must be >= 0"),
    ("--eplb-rebalance-num-iterations 0", "--eplb-rebalance-num-iterations must be >= 1"),
    ("--eplb-rebalance-layers-per-chunk 0", "--eplb-rebalance-layers-per-chunk must be >= 1"),
    ("--eplb-min-rebalancing-utilization-threshold 1.5", "--eplb-min-rebalancing-utilization-threshold must be in"),
    ("--tp 2 --ep 2 --init-expert-location /nonexistent.json", "--init-expert-location /nonexistent.json: no such"),
    ("--tp 2 --ep 2 --expert-distribution-dir /tmp/x", "--expert-distribution-dir records the load EPLB"),
    ("--enable-two-batch-overlap", "--enable-two-batch-overlap overlaps dispatch"),
    ("--disaggregation-mode prefill --deepep-mode low_latency", "--deepep-mode low_latency cannot be used"),
    ("--disaggregation-mode decode --deepep-mode normal", "--deepep-mode normal cannot be used"),
    ("--disaggregation-mode prefill --port 8998", "--disaggregation-bootstrap-port (8998) must differ from --port"),
    ("--tokenizer-worker-num 0", "--tokenizer-worker-num must be >= 1, got 0"),
    ("--tokenizer-worker-num 2 --nnodes 2 --dist-init-addr 127.0.0.1:5000 --tp 2",
     "--tokenizer-worker-num > 1 needs a one-node instance"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_combination_fails_naming_the_flag(argv: str, message: str) -> None:
    with pytest.raises(ServerArgsError, match=re.escape(message)):
        parse(argv)


@no_cuda
def test_cuda_requested_without_cuda_fails() -> None:
    with pytest.raises(ServerArgsError, match="--device cuda"):
        parse("--device cuda")


def test_npu_requested_without_torch_npu_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa, "_npu_available", lambda: False)
    with pytest.raises(ServerArgsError, match="--device npu"):
        parse("--device npu")


GOOD = [  # valid combinations: validation accepts them (only the not-implemented gate may refuse)
    dict(tp_size=8, ep_size=8, moe_a2a_backend="torch"),
    dict(tp_size=4, ep_size=2),
    dict(tp_size=4, dp_size=2, enable_dp_attention=True),
    dict(tp_size=4, nnodes=2, node_rank=1, dist_init_addr="[::1]:5000"),
    dict(tp_size=2, ep_size=2, moe_a2a_backend="torch", enable_eplb=True, ep_num_redundant_experts=2),
    dict(tp_size=2, ep_size=2, moe_a2a_backend="torch", enable_two_batch_overlap=True),
    dict(chunked_prefill_size=-1, page_size=1, max_total_tokens=1),
    dict(deepep_mode="low_latency"),
]


@pytest.mark.parametrize("kwargs", GOOD, ids=[str(g) for g in GOOD])
def test_valid_combination_constructs(kwargs: dict) -> None:
    a = ServerArgs(device="cpu", **kwargs)
    for k, v in kwargs.items():
        assert getattr(a, k) == v
    assert a.moe_tp_size * a.ep_size == a.tp_size
    assert a.attn_tp_size == a.tp_size // (a.dp_size if a.enable_dp_attention else 1)


@pytest.mark.parametrize(("mode", "want"), [("prefill", "normal"), ("decode", "low_latency")])
def test_deepep_mode_auto_follows_disaggregation_mode(mode: str, want: str) -> None:
    a = ServerArgs(device="cpu", disaggregation_mode=mode)
    assert a.deepep_mode == want and a.is_disaggregated


NOT_YET = [
    ("--pp-size 2", ["--pp-size 2"]),
    ("--speculative-moe-runner-backend torch", ["--speculative-moe-runner-backend"]),
]

PARALLEL_NOW_ACCEPTED = [
    "--tp 2",
    "--tp 2 --ep 2 --moe-a2a-backend torch",
    "--tp 2 --ep 2 --enable-eplb --ep-num-redundant-experts 2",
    "--tp 2 --ep 2 --moe-a2a-backend torch --enable-single-batch-overlap",
    "--tp 2 --ep 2 --moe-a2a-backend torch --enable-two-batch-overlap",
    "--enable-single-batch-overlap",
    "--init-expert-location trivial",  # SGLang's default, accepted by name
    "--tp 4 --ep 2",
    "--tp 2 --dp-size 2 --enable-dp-attention",
    "--tp 4 --dp-size 2 --enable-dp-attention",
    "--tp 2 --nnodes 2 --dist-init-addr 127.0.0.1:5000",
    "--tp 2 --dp-size 2 --enable-dp-attention --disaggregation-mode prefill",
    "--tp 4 --dp-size 2 --enable-dp-attention --disaggregation-mode decode",
    "--tp 2 --dp-size 2 --enable-dp-attention --nnodes 2 --dist-init-addr 127.0.0.1:5000",
]


@pytest.mark.parametrize("argv", PARALLEL_NOW_ACCEPTED)
def test_parallel_layouts_parse(argv: str) -> None:
    args = parse(argv)
    assert args.world_size == args.tp_size


def test_low_latency_only_mode_is_refused_for_a_unified_instance_with_an_all_to_all_backend() -> None:
    with pytest.raises(ServerArgsError, match="--deepep-mode low_latency cannot run prefill batches"):
        parse("--tp 2 --ep 2 --moe-a2a-backend torch --deepep-mode low_latency")
    assert parse("--tp 2 --ep 2 --moe-a2a-backend torch --deepep-mode low_latency "
                 "--disaggregation-mode decode").deepep_mode == "low_latency"


@pytest.mark.parametrize(("argv", "flags"), NOT_YET, ids=[n[0] for n in NOT_YET])
def test_not_implemented_feature_is_refused(argv: str, flags: list[str]) -> None:
    with pytest.raises(ServerArgsError) as e:
        parse(argv)
    for flag in flags:
        assert f"{flag} is not implemented yet in this build" in str(e.value)


def test_gpu_only_runner_and_npu_device_are_refused_as_not_implemented(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sa, "_cuda_available", lambda: True)
    monkeypatch.setattr(sa, "_npu_available", lambda: True)
    with pytest.raises(ServerArgsError, match="--moe-runner-backend cutlass is not implemented yet"):
        parse("--device cuda --moe-runner-backend cutlass")
    assert parse("--device cuda --moe-runner-backend triton").moe_runner_backend == "triton"
    assert parse("--device cuda --moe-runner-backend deep_gemm").moe_runner_backend == "deep_gemm"
    with pytest.raises(ServerArgsError, match="--device npu is not implemented yet"):
        parse("--device npu")
    with pytest.raises(ServerArgsError, match="--moe-a2a-backend mori is not implemented yet"):
        parse("--device cuda --tp 2 --ep 2 --moe-a2a-backend mori")


def test_deepep_mode_without_ep_is_accepted() -> None:
    assert parse("--deepep-mode normal").deepep_mode == "normal"


def test_unknown_backend_name_exits_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ServerArgs.from_cli(["--moe-a2a-backend", "nccl"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--moe-a2a-backend" in err and "invalid choice" in err


def test_transfer_backend_choices_are_the_kvtransfer_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtransfer import _BACKENDS

    for name in _BACKENDS:  # each registered backend parses
        args = ServerArgs.from_cli(["--device", "cpu", "--disaggregation-transfer-backend", name])
        assert args.disaggregation_transfer_backend == name
    unknown = "fake"
    assert unknown not in _BACKENDS
    with pytest.raises(SystemExit) as e:  # refused by the parser, not later inside the engine process
        ServerArgs.from_cli(["--device", "cpu", "--disaggregation-transfer-backend", unknown])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--disaggregation-transfer-backend" in err and "invalid choice" in err


def test_from_cli_turns_server_args_error_into_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        ServerArgs.from_cli(["--device", "cpu", "--page-size", "0"])
    assert e.value.code == 2
    assert "--page-size must be >= 1" in capsys.readouterr().err


def test_replace_revalidates_and_instances_are_frozen() -> None:
    a = ServerArgs(device="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.port = 1  # type: ignore[misc]
    assert dataclasses.replace(a, port=31000).port == 31000
    with pytest.raises(ServerArgsError, match="--page-size"):
        dataclasses.replace(a, page_size=0)


def test_json_dict_has_every_field_and_hides_the_api_key() -> None:
    a = ServerArgs(device="cpu", api_key="s3cret", host="::1")
    d = json.loads(json.dumps(a.to_json_dict()))
    assert set(d) == {f.name for f in dataclasses.fields(ServerArgs)}
    assert "s3cret" not in json.dumps(d) and d["api_key"] is not None
    assert a.url == "http://[::1]:30000"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_rejects_bad_combination_with_exit_code_2() -> None:
    r = _run("-m", "pd", "serve", "--ep", "3", "--tp", "2")
    assert r.returncode == 2
    assert "--ep-size (3) must divide --tp-size (2)" in r.stderr


def test_cli_help_lists_every_subcommand() -> None:
    r = _run("-m", "pd", "--help")
    assert r.returncode == 0
    for cmd in ("serve", "up", "lb", "bench", "build-default-model"):
        assert re.search(rf"^\s+{re.escape(cmd)}\b", r.stdout, re.M), cmd


@pytest.fixture
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_format_has_time_process_and_level(restore_root_logging: None) -> None:
    cli.setup_logging("debug")
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    fmt = root.handlers[0].formatter._fmt  # type: ignore[union-attr]
    assert all(k in fmt for k in ("%(asctime)s", "%(processName)s", "%(levelname)s"))


def test_serve_hands_parsed_args_and_the_instance_spec_to_run_server(
    monkeypatch: pytest.MonkeyPatch, restore_root_logging: None, tmp_path: Any
) -> None:
    from tests.tiny_checkpoints import make_checkpoint

    path = make_checkpoint("llama", str(tmp_path / "llama"))
    seen: list[tuple[ServerArgs, Any]] = []
    fake_app = types.SimpleNamespace(run_server=lambda args, spec: seen.append((args, spec)))
    monkeypatch.setitem(sys.modules, "pd.server.app", fake_app)
    flags = ["--model-path", path, "--device", "cpu", "--log-level", "warning"]
    assert main(["serve", *flags, "--port", "31234", "--tp", "2"]) == 0
    assert len(seen) == 1 and seen[0][0].port == 31234 and seen[0][0].device == "cpu"
    from decode.scheduler import DecodeScheduler
    from pd.engine.spec import default_scheduler
    from prefill.scheduler import PrefillScheduler

    spec = seen[0][1]
    assert spec.make_scheduler is default_scheduler and spec.layout.tp == 2 and spec.runner.model_path == path
    for mode, factory in (("prefill", PrefillScheduler), ("decode", DecodeScheduler)):
        assert main(["serve", *flags, "--disaggregation-mode", mode]) == 0
        assert seen[-1][0].disaggregation_mode == mode and seen[-1][1].make_scheduler is factory
        assert seen[-1][1].disagg is not None
    assert logging.getLogger().level == logging.WARNING


def test_build_default_model_prints_the_built_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_root_logging: None
) -> None:
    calls: list[dict] = []

    def build_default_model(cache_dir: str | None, force: bool) -> str:
        calls.append(dict(cache_dir=cache_dir, force=force))
        return "/cache/pd-default"

    monkeypatch.setitem(sys.modules, "pd.default_model", types.SimpleNamespace(build_default_model=build_default_model))
    assert main(["build-default-model", "--force"]) == 0
    assert calls == [dict(cache_dir=None, force=True)]
    assert capsys.readouterr().out.strip() == "/cache/pd-default"
