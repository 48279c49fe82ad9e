"""What `pd bench` reports, through the CLI against the stub server (tests/bench_stub.py): chosen percentiles,
goodput against SLOs, PNG plots, and flags' defaults in --help.

Oracles: numpy's percentile of the per-request values in the same report; goodput counted by hand on synthetic
latencies; the PNG format's signature and header; the flags' documented defaults.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launch.cli import build_parser
from launch.cli import main as cli_main
from pd.bench.client import RequestOutput
from pd.bench.plots import token_times
from pd.bench.report import compute_metrics
from tests.bench_stub import StubState, reset, run_bench, serve_stub

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[str, StubState]]:
    with serve_stub() as stub:
        yield stub


@pytest.fixture
def stub(stub_server: tuple[str, StubState]) -> tuple[str, StubState]:
    url, state = reset(stub_server)
    state.ttft_s, state.itl_s = 0.004, 0.002
    return url, state


def bench(url: str, tmp_path: Path, *flags: str) -> dict[str, Any]:
    return run_bench(url, tmp_path, "--input-len-range", "2", "4", *flags)


def test_chosen_percentiles_are_reported_beside_p50_p90_p99(
    stub: tuple[str, StubState], tmp_path: Path, capsys: Any
) -> None:
    url, _ = stub
    report = bench(url, tmp_path, "--num-prompts", "12", "--output-len-range", "2", "20", "--percentiles",
                   "25,95,99.9")  # fmt: skip
    table = capsys.readouterr().out
    ok = [r for r in report["requests"] if r["success"]]
    m = report["metrics"]
    for key, values in (("ttft_ms", [r["ttft"] for r in ok]), ("e2e_ms", [r["latency"] for r in ok])):
        assert set(m[key]) == {"mean", "std", "p25", "p50", "p90", "p95", "p99", "p99.9"}
        for p in (25, 50, 90, 95, 99, 99.9):
            assert m[key][f"p{p:g}"] == pytest.approx(np.percentile(np.array(values) * 1000, p))
    # The table shows the requested ones only.
    assert "TTFT p25 (ms)" in table and "E2E latency p99.9 (ms)" in table and "TTFT p90" not in table
    assert report["config"]["percentiles"] == [25, 95, 99.9]


def test_goodput_counts_the_requests_that_met_every_slo_per_second() -> None:
    def out(ttft: float, latency: float, tokens: int, ok: bool = True) -> RequestOutput:
        return RequestOutput(prompt_len=1, success=ok, ttft=ttft, latency=latency, output_tokens=tokens)

    # TPOT (ms): a 100, b 100, c 1950, d has one token (no TPOT: meets any), e failed (never counts).
    outs = [out(0.1, 1.0, 10), out(0.3, 0.5, 3), out(0.05, 2.0, 2), out(0.1, 0.2, 1), out(0.01, 0.1, 5, ok=False)]
    duration = 2.0
    cases = [
        ((("ttft", 200.0),), 3),  # a, c, d
        ((("ttft", 200.0), ("tpot", 150.0)), 2),  # a, d
        ((("ttft", 200.0), ("tpot", 150.0), ("e2el", 500.0)), 1),  # d
        ((("e2el", 1000.0),), 3),  # a (exactly at its SLO), b, d
        ((("tpot", 99.0),), 1),  # d
    ]
    for slos, met in cases:
        assert compute_metrics(outs, duration, slos=slos)["request_goodput"] == pytest.approx(met / duration), slos
    assert compute_metrics(outs, duration)["request_goodput"] is None


def test_goodput_flag_matches_the_count_over_the_reports_own_requests(
    stub: tuple[str, StubState], tmp_path: Path, capsys: Any
) -> None:
    url, _ = stub
    report = bench(url, tmp_path, "--num-prompts", "12", "--output-len-range", "2", "30", "--seed", "3",
                   "--goodput", "e2el:40", "ttft:30")  # fmt: skip
    assert "Request goodput (req/s)" in capsys.readouterr().out
    met = [r for r in report["requests"] if r["success"] and r["latency"] * 1000 <= 40 and r["ttft"] * 1000 <= 30]
    m = report["metrics"]
    assert m["request_goodput"] == pytest.approx(len(met) / m["duration_s"])
    assert report["config"]["goodput"] == {"e2el": 40.0, "ttft": 30.0}
    for bad, message in ((["--goodput", "ttft=5"], "NAME:MS"), (["--goodput", "ttft:-1"], "positive"),
                         (["--goodput", "itl:5"], "ttft, tpot, e2el"), (["--percentiles", "50,101"], "[0, 100]"),
                         (["--percentiles", "p99"], "comma-separated")):  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            cli_main(["bench", "--base-url", url, *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err, bad


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_latency_cdfs_and_throughput_pngs_beside_the_json(
    stub: tuple[str, StubState], tmp_path: Path, capsys: Any
) -> None:
    url, _ = stub
    plots = tmp_path / "plots"
    report = bench(url, tmp_path, "--num-prompts", "8", "--request-rate", "100", "--output-len-range", "3", "12",
                   "--plot", str(plots))  # fmt: skip
    assert "Serving Benchmark Result" in capsys.readouterr().out
    assert sorted(p.name for p in plots.iterdir()) == ["latency_cdf.png", "report.json", "throughput.png"]
    assert json.loads((plots / "report.json").read_text())["metrics"] == report["metrics"]
    for name in ("latency_cdf.png", "throughput.png"):
        width, height = _png_size(plots / name)
        assert width >= 400 and height >= 300 and (plots / name).stat().st_size > 10_000


def test_plot_without_matplotlib_fails_before_sending_anything(
    stub: tuple[str, StubState], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, state = stub
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an import of a missing package raises
    assert cli_main(["bench", "--base-url", url, "--plot", str(tmp_path / "p"), "--disable-progress"]) == 1
    assert "--plot needs matplotlib" in capsys.readouterr().err and state.count == 0


def test_token_times_place_tokens_where_their_events_arrived() -> None:
    # Sent at 1.0 and 2.0 (run start 0.5): the first token at 1.25 then ITLs 0.1, 0.2; the second request's
    # whole answer (3 tokens, no ITLs) at 2.5; the failed one contributes nothing.
    outs = [
        RequestOutput(prompt_len=1, success=True, ttft=0.25, itl=[0.1, 0.2], latency=0.6, output_tokens=3,
                      start_time=1.0),
        RequestOutput(prompt_len=1, success=True, ttft=0.5, latency=0.5, output_tokens=3, start_time=2.0),
        RequestOutput(prompt_len=1, start_time=2.0, error="x"),
    ]  # fmt: skip
    assert np.allclose(token_times(outs, 0.5), [0.75, 0.85, 1.05, 2.0, 2.0, 2.0])


def _subparser(name: str) -> argparse.ArgumentParser:
    ns, _ = build_parser().parse_known_args([name])
    return ns.subparser


def test_help_shows_every_bench_default_and_describes_up_policy() -> None:
    bench = _subparser("bench")
    text = " ".join(bench.format_help().split())
    for action in bench._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction)):
            assert action.help and "default" in action.help, action.option_strings
    shown = ["(default: 100)", "(default: inf)", "(default: 1.0)", "(default: 50,90,95,99)", "(default: native)",
             "(default: http://127.0.0.1:30000", "(default: 3)", "(default: 3600.0)"]  # fmt: skip
    assert all(s in text for s in shown), [s for s in shown if s not in text]
    up = " ".join(_subparser("up").format_help().split())
    assert "power_of_two (the less loaded of two random picks)" in up and "(default: power_of_two)" in up
    assert "cache_aware (the instance holding the longest prefix of the request)" in up
