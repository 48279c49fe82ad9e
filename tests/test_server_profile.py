"""Profiling a running server (/start_profile, /stop_profile; pd.engine.profiler): which steps a trace holds, the
followers' traces, refusals, and the device-time summary against a brute-force one."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random
import secrets
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

from pd.engine import profiler
from pd.engine.io import ProfileRequest, to_dict
from pd.engine.profiler import StepProfiler, idle_spells, kernel_timeline, trace_device_events, trace_timeline
from tests.server_process import pd_serve
from tests.test_http_api import tokenizer as tokenizer  # noqa: F401  (session fixture)
from tests.tiny_checkpoints import make_checkpoint

CPU = torch.device("cpu")


def _request(out: str, **kw: Any) -> ProfileRequest:
    return ProfileRequest(f"r{secrets.token_hex(4)}", "start", output_dir=out, profile_id=f"{time.time():.6f}",
                          with_stack=False, record_shapes=False, **kw)  # fmt: skip


def _run_steps(profilers: list[StepProfiler], first: int, count: int) -> None:
    """Engine steps ``first`` .. ``first + count - 1``, each marked with its index in the profile."""
    for i in range(first, first + count):
        with torch.profiler.record_function(f"step-{i}"):
            torch.ones(8) @ torch.ones(8)
        for p in profilers:
            p.after_step()


def _steps_in(path: str) -> list[int]:
    with gzip.open(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    return sorted({int(e["name"][5:]) for e in events if str(e.get("name", "")).startswith("step-")})


def test_a_trace_holds_exactly_the_steps_the_request_names(tmp_path) -> None:
    rng = random.Random(secrets.randbits(32))
    for case in range(4):
        out = str(tmp_path / f"case{case}")
        prof = StepProfiler(CPU, "TP-0-DP-0")
        before = rng.randrange(0, 4)
        _run_steps([prof], 0, before)
        start_step = rng.choice([None, rng.randrange(0, 8)])
        num_steps = rng.randrange(1, 4)
        assert prof.start(_request(out, start_step=start_step, num_steps=num_steps)) == (True, "")
        _run_steps([prof], before, 12)
        first = max(start_step or 0, before)
        files = os.listdir(out)
        assert len(files) == 1 and files[0].endswith("-TP-0-DP-0.trace.json.gz"), files
        assert _steps_in(os.path.join(out, files[0])) == list(range(first, first + num_steps)), (before, start_step)
        assert not prof.active  # stopped itself: a stop now is refused
        assert prof.stop() == (False, "Profiling is not in progress. Call /start_profile first.")


def test_a_profile_without_num_steps_records_until_stopped_and_refuses_a_second_start(tmp_path, monkeypatch,
                                                                                      caplog) -> None:  # fmt: skip
    monkeypatch.setattr(profiler, "LONG_PROFILE_STEPS", 2)  # a forgotten profile is reminded of in the log
    prof = StepProfiler(CPU, "TP-0-DP-0")
    req = _request(str(tmp_path), prefix="run1")
    assert prof.start(req)[0]
    ok, message = prof.start(_request(str(tmp_path)))
    assert not ok and "already in progress" in message
    _run_steps([prof], 0, 5)
    ok, path = prof.stop()
    assert ok and path == os.path.join(str(tmp_path), f"run1-{req.profile_id}-TP-0-DP-0.trace.json.gz")
    assert _steps_in(path) == [0, 1, 2, 3, 4]
    assert sum("goes on until /stop_profile" in r.message for r in caplog.records) == 2  # after steps 2 and 4
    # Stopped before its start step: nothing written, and a new profile can start.
    assert prof.start(_request(str(tmp_path / "later"), start_step=100))[0]
    _run_steps([prof], 5, 3)
    assert prof.stop() == (True, "") and os.listdir(tmp_path / "later") == []
    assert prof.start(_request(str(tmp_path / "again")))[0] and prof.stop()[0]


class FakeSync:
    """A StepSync stand-in: what a leader sends (with the step it comes before), what each rank gathers."""

    def __init__(self, is_leader: bool, others: list[dict[str, Any]] | None = None) -> None:
        self.is_leader, self.others = is_leader, others or []
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.gathered: list[dict[str, Any]] = []
        self.step = 0

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append((self.step + 1, json.loads(json.dumps(msg))))  # what crosses the wire: plain values

    def gather(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        self.gathered.append(msg)
        return [msg, *self.others]


def test_followers_record_the_same_steps_as_their_leader_who_lists_every_trace(tmp_path) -> None:
    follower_trace = str(tmp_path / "then-TP-1-DP-0.trace.json.gz")
    lead_sync = FakeSync(True, others=[{"trace": follower_trace, "error": ""}])
    leader = StepProfiler(CPU, "TP-0-DP-0", lead_sync)  # type: ignore[arg-type]
    req = _request(str(tmp_path / "leader"), start_step=2)
    leader.start(req)
    for lead_sync.step in range(4):
        _run_steps([leader], lead_sync.step, 1)
    ok, paths = leader.stop()
    assert ok and paths.splitlines() == [str(tmp_path / "leader" / f"{req.profile_id}-TP-0-DP-0.trace.json.gz"),
                                         follower_trace]  # fmt: skip
    assert [m["action"] for _, m in lead_sync.sent] == ["start", "stop"]
    # The follower (its own process in a server: one torch profiler runs per process) acts on each message before
    # the forward that follows it, as pd.engine.rank._follow does.
    follow_sync = FakeSync(False)
    follower = StepProfiler(CPU, "TP-1-DP-0", follow_sync)  # type: ignore[arg-type]
    for step in range(5):
        for msg in [m for before, m in lead_sync.sent if before == step]:
            follower.follow(msg)
        _run_steps([], step, 1)
    mine = os.path.join(req.output_dir, f"{req.profile_id}-TP-1-DP-0.trace.json.gz")
    assert follow_sync.gathered == [{"trace": mine, "error": ""}]
    assert _steps_in(paths.splitlines()[0]) == _steps_in(mine) == [2, 3]


def test_a_follower_that_fails_still_answers_and_its_leader_reports_it(tmp_path) -> None:
    (tmp_path / "afile").write_text("")
    follow_sync = FakeSync(False)
    follower = StepProfiler(CPU, "TP-1-DP-0", follow_sync)  # type: ignore[arg-type]
    for where in (tmp_path / "afile" / "under", tmp_path / "fine"):  # cannot start there; then writes its trace
        request = ProfileRequest("x", "start", output_dir=str(where), profile_id="1")
        follower.follow({"op": "profile", "action": "start", "request": to_dict(request)})
        _run_steps([], 0, 1)
        follower.follow({"op": "profile", "action": "stop"})
    assert follow_sync.gathered[0]["trace"] == "" and "TP-1-DP-0 could not start" in follow_sync.gathered[0]["error"]
    assert follow_sync.gathered[1] == {"trace": str(tmp_path / "fine" / "1-TP-1-DP-0.trace.json.gz"), "error": ""}
    follow_sync.gathered.pop()
    lead_sync = FakeSync(True, others=follow_sync.gathered)
    leader = StepProfiler(CPU, "TP-0-DP-0", lead_sync)  # type: ignore[arg-type]
    leader.start(_request(str(tmp_path)))
    _run_steps([leader], 0, 1)
    ok, message = leader.stop()
    assert not ok and "TP-1-DP-0" in message
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".gz")]) == 1  # the leader's own trace is written


def test_a_trace_that_cannot_be_written_is_an_error_and_profiling_can_start_again(tmp_path) -> None:
    prof = StepProfiler(CPU, "TP-0-DP-0")
    out = tmp_path / "gone"
    assert prof.start(_request(str(out)))[0]
    _run_steps([prof], 0, 2)
    out.rmdir()
    out.write_text("a file where the directory was")
    ok, message = prof.stop()
    assert not ok and "failed to stop" in message
    assert prof.start(_request(str(tmp_path / "new")))[0]
    _run_steps([prof], 2, 1)
    assert _steps_in(prof.stop()[1]) == [2]
    ok, message = prof.start(_request(str(out / "sub")))  # under a file: cannot be created
    assert not ok and "cannot create the output directory" in message
    ok, message = prof.start(_request(str(tmp_path / "gpu"), activities=["GPU"]))  # nothing to record on a CPU
    assert not ok and "need a CUDA device" in message and not prof.active


def _fake_profile(spans: list[tuple[float, float]]) -> Any:
    def event(start: float, end: float, device: str, name: str, annotation: bool = False) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name,
                               device_type=SimpleNamespace(name=device), is_user_annotation=annotation)  # fmt: skip

    events = [event(s, e, "CUDA", f"k{i}") for i, (s, e) in enumerate(spans)]
    events.append(event(0.0, 1e9, "CPU", "host"))
    # A record_function range (an engine step) as the profiler projects it onto the device: not device time.
    events.append(event(0.0, 1e9, "CUDA", "engine step 0", annotation=True))
    events.append(event(0.0, 1e9, "CUDA", "engine step 1"))  # (in case a torch marks it as no annotation)
    return SimpleNamespace(events=lambda: events)


def test_device_time_summary_equals_a_brute_force_count_on_random_kernels(tmp_path) -> None:
    rng = random.Random(secrets.randbits(32))
    for _ in range(20):
        spans = []
        for _ in range(rng.randrange(1, 30)):
            start = rng.randrange(0, 2000)
            spans.append((float(start), float(start + rng.randrange(1, 120))))
        covered = set()
        for s, e in spans:
            covered.update(range(int(s), int(e)))  # 1 us cells
        lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
        idle_cells = [t for t in range(int(lo), int(hi)) if t not in covered]
        t = kernel_timeline(_fake_profile(spans))
        # The same read back from a written trace (host events and instant events beside the device's).
        trace = [{"ph": "X", "cat": rng.choice(["kernel", "gpu_memcpy", "gpu_memset"]), "ts": s, "dur": e - s,
                  "name": "k"} for s, e in spans]  # fmt: skip
        trace += [{"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 5000, "name": "host"},
                  {"ph": "i", "cat": "kernel", "ts": 9000, "name": "marker"}]  # fmt: skip
        with gzip.open(tmp_path / "t.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": rng.sample(trace, len(trace))}, f)
        assert trace_timeline(trace_device_events(str(tmp_path / "t.trace.json.gz"))) == pytest.approx(t)
        assert t["busy_ms"] == pytest.approx(len(covered) / 1e3)
        assert t["span_ms"] == pytest.approx((hi - lo) / 1e3)
        assert t["idle_ms"] == pytest.approx(len(idle_cells) / 1e3)
        # idle spells: the runs of idle cells, longest first
        runs, run = [], []
        for c in idle_cells:
            if run and c != run[-1] + 1:
                runs.append(run)
                run = []
            run.append(c)
        if run:
            runs.append(run)
        spells = idle_spells(_fake_profile(spans), 3)
        longest = sorted((len(r) / 1e3 for r in runs), reverse=True)[:3]
        assert sorted((g["idle_ms"] for g in spells), reverse=True) == pytest.approx(longest)
        by_start = {round((r[0] - lo) / 1e3, 3): round(len(r) / 1e3, 3) for r in runs}
        assert all(by_start[g["at_ms"]] == g["idle_ms"] for g in spells)  # each spell is one of the runs
        assert [g["at_ms"] for g in spells] == sorted(g["at_ms"] for g in spells)  # in time order


async def _generate_concurrently(url: str, count: int) -> None:
    """``count`` requests at once: with DP attention each group gets some (the one with fewer in flight)."""
    async with httpx.AsyncClient(timeout=120) as c:
        rs = await asyncio.gather(*(c.post(url + "/generate", json={
            "input_ids": [5 + i, 6, 7], "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
            for i in range(count)))  # fmt: skip
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]


def _names_in(path: str) -> set[str]:
    with gzip.open(path, "rt") as f:
        return {e.get("name") for e in json.load(f)["traceEvents"]}


@pytest.mark.xdist_group("serve")
def test_start_and_stop_profile_over_http_write_every_ranks_trace_of_the_forwards(tmp_path, monkeypatch) -> None:
    """A real server of two DP-attention groups of two ranks each, behind two front processes: every rank writes a
    trace of the same profile, and each holds the forward of the requests sent meanwhile (their embedding lookup);
    refusals answer 400."""
    path = make_checkpoint("qwen3_moe", str(tmp_path / "model"), seed=secrets.randbelow(2**31))
    out, default_dir = tmp_path / "traces", tmp_path / "default"
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", str(default_dir))  # the server inherits it
    with pd_serve(path, "--tp", "4", "--dp-size", "2", "--enable-dp-attention", "--tokenizer-worker-num", "2") as url, \
            httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as c:  # fmt: skip
        # (a connection per call: the calls reach either front process, and the engine answers the one that asked)
        for body, why in [({"activities": ["MEM"]}, "activities"), ({"profile_prefix": "a/b"}, "profile_prefix"),
                          ({"num_steps": 0}, "num_steps"), ({"merge_profiles": True}, "merge_profiles")]:  # fmt: skip
            r = c.post(url + "/start_profile", json=body)
            assert r.status_code == 400 and why in r.json()["error"]["message"], r.text
        r = c.post(url + "/stop_profile")
        assert r.status_code == 400 and "not in progress" in r.json()["error"]["message"]
        r = c.post(url + "/start_profile", json={"output_dir": str(out), "profile_prefix": "t", "with_stack": False})
        assert r.status_code == 200 and r.text == "Start profiling.\n"
        assert c.post(url + "/start_profile").status_code == 400  # one at a time
        asyncio.run(_generate_concurrently(url, 4))
        r = c.post(url + "/stop_profile")
        assert r.status_code == 200, r.text
        lines = r.text.splitlines()
        assert lines[0] == "Stop profiling. This will take some time."
        profile_id = os.path.basename(lines[1]).split("-")[1]
        expected = sorted(f"t-{profile_id}-TP-{r}-DP-{g}.trace.json.gz" for g in (0, 1) for r in (0, 1))
        assert sorted(lines[1:]) == [str(out / name) for name in expected]  # written, the followers' too
        assert sorted(os.listdir(out)) == expected
        for name in expected:
            assert "aten::embedding" in _names_in(str(out / name)), name
        leader_steps = [n for n in _names_in(str(out / expected[0])) if n and n.startswith("engine step ")]
        assert leader_steps, "the leader's steps are marked in its trace"

        # No body (GET, as SGLang allows): the directory from SGLANG_TORCH_PROFILER_DIR; num_steps ends it alone.
        assert c.get(url + "/start_profile").status_code == 200
        assert c.get(url + "/stop_profile").status_code == 200 and len(os.listdir(default_dir)) == 4
        assert c.post(url + "/start_profile", json={"num_steps": 1, "output_dir": str(tmp_path / "one")}).is_success
        asyncio.run(_generate_concurrently(url, 2))
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path / "one")) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(os.listdir(tmp_path / "one")) == 4
        assert c.post(url + "/stop_profile").status_code == 400  # already over
        # A profile still running when the server stops is written at its shutdown.
        assert c.post(url + "/start_profile", json={"output_dir": str(tmp_path / "last")}).is_success
        asyncio.run(_generate_concurrently(url, 2))
    assert len(os.listdir(tmp_path / "last")) == 4


@pytest.mark.gpu
def test_on_a_gpu_a_served_profile_holds_the_forwards_kernels(tmp_path) -> None:
    """On CUDA the traces hold the device's kernels (graph replays included) and their timeline adds up."""
    from pd.engine.profiler import DEVICE_CATEGORIES
    from tests.server_process import free_port, pd_process

    path = make_checkpoint("deepseek_v3", str(tmp_path / "model"), seed=secrets.randbelow(2**31))
    port = free_port()
    with pd_process(["serve", "--model-path", path, "--device", "cuda", "--port", str(port)], port) as url, \
            httpx.Client(timeout=120) as c:  # fmt: skip
        settings = {"output_dir": str(tmp_path / "traces"), "with_stack": False, "record_shapes": False}
        assert c.post(url + "/start_profile", json=settings).status_code == 200
        asyncio.run(_generate_concurrently(url, 3))
        r = c.post(url + "/stop_profile")
        assert r.status_code == 200, r.text
    (trace,) = r.text.splitlines()[1:]
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X"]
    t = trace_timeline(trace_device_events(trace))
    assert kernels and t["kernels"] == len([k for k in kernels if float(k["dur"]) > 0])
    assert 0 < t["busy_ms"] <= t["span_ms"] and t["idle_ms"] == pytest.approx(t["span_ms"] - t["busy_ms"], abs=1e-3)


def test_a_start_refused_by_one_dp_group_is_undone_on_the_others(tokenizer: Any) -> None:
    """Under DP attention each group's leader answers for its group: when one refuses, the groups that started stop
    again (all or none), and the client gets the refusal."""
    from fastapi.testclient import TestClient

    from tests.test_http_api import make_app

    app, fake = make_app(tokenizer)
    calls: list[tuple[str, dict[str, Any]]] = []
    answers = {"start": [(True, ""), (False, "cannot create the output directory '/x': denied")], "stop": [(True, "")]}

    async def profile(action: str, **settings: Any) -> list[tuple[bool, str]]:
        calls.append((action, settings))
        return answers[action]

    fake.profile = profile  # type: ignore[attr-defined]
    r = TestClient(app).post("/start_profile", json={"output_dir": "/x", "num_steps": 3})
    assert r.status_code == 400 and "denied" in r.json()["error"]["message"]
    assert [a for a, _ in calls] == ["start", "stop"]
    assert calls[0][1]["output_dir"] == "/x" and calls[0][1]["num_steps"] == 3
    answers["start"] = [(False, "Profiling is already in progress. Call /stop_profile first.")] * 2
    calls.clear()
    assert TestClient(app).post("/start_profile").status_code == 400 and [a for a, _ in calls] == ["start"]
