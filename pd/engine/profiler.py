"""Profiling a running server (SGLang's /start_profile and /stop_profile): torch.profiler over the engine's steps.

The leader of each attention group owns a StepProfiler: it starts recording at the step the request names (at once by
default), counts the steps it records, stops after ``num_steps`` of them or when told, and writes a Chrome trace per
rank (``{prefix-}{profile_id}-[prefill-|decode-]TP-{rank}-DP-{group}.trace.json.gz``, Perfetto opens it). Its
followers record the same steps: the leader broadcasts the start and the stop between forwards
(pd.dist.step_sync's "profile" op), so every rank's trace covers the same forwards, and the leader answers the stop
once every rank of its group has written its trace (they tell it where over the group, StepSync.gather).

A step is one turn of the engine that ran a forward (a prefill chunk batch, a decode step). Once a trace is written
the leader logs what the device did in it: its busy time against the span from the first kernel to the last, and the
longest idle spells (what the host made the device wait for), the question a served run's profile answers first.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from pd.engine.io import ProfileRequest, from_dict, to_dict

if TYPE_CHECKING:
    from pd.dist.step_sync import StepSync

logger = logging.getLogger(__name__)

# What /start_profile's "activities" may name here (SGLang's MEM and RPD are refused by the front).
ACTIVITIES = ("CPU", "GPU")
# A Chrome trace's categories of device events (torch.profiler's export).
DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
# The name of the range that marks each engine step in a trace ("engine step 12").
STEP_RANGE = "engine step"
# A profile without num_steps is reminded of every this many steps (a forgotten one slows the server and grows).
LONG_PROFILE_STEPS = 10_000
# Idle spells of the device named in the log line, longest first.
LOGGED_IDLE_SPELLS = 3


class StepProfiler:
    """One rank's profiler. ``sync``: its attention group's step_sync channel when the group has several ranks (the
    leader's sends the start and the stop to the followers, and every rank's gathers where the traces went);
    ``rank_tag`` names this rank in its trace's file name ("TP-0-DP-0")."""

    def __init__(self, device: torch.device, rank_tag: str, sync: StepSync | None = None) -> None:
        self.device, self.rank_tag, self.sync = device, rank_tag, sync
        self.steps = 0  # engine steps since start-up (SGLang's start_step counts these)
        self.active = False  # armed or recording: after_step has work to do
        self._req: ProfileRequest | None = None
        self._start_at = 0  # the step recording starts at
        self._recorded = 0
        self._prof: torch.profiler.profile | None = None
        self._began = 0.0
        self._failed = ""  # a follower's: why its profile did not start, told to the leader at the stop

    def start(self, req: ProfileRequest) -> tuple[bool, str]:
        """Arms the profiler for ``req`` (recording now, or at its start_step). (True, ""), or (False, why not)."""
        if self._req is not None:
            return False, "Profiling is already in progress. Call /stop_profile first."
        try:
            os.makedirs(req.output_dir, exist_ok=True)
        except OSError as e:
            return False, f"cannot create the output directory {req.output_dir!r}: {e}"
        if not os.access(req.output_dir, os.W_OK):
            return False, f"the output directory {req.output_dir!r} is not writable"
        if not self._activities(req):
            return False, f"activities {req.activities}: GPU events need a CUDA device; this rank runs on {self.device}"
        self._req, self._recorded, self.active = req, 0, True
        # SGLang's start_step is the step count since start-up; one already past starts with the next step.
        self._start_at = max(req.start_step or 0, self.steps)
        if self._start_at == self.steps:
            try:
                self._begin()
            except Exception as e:  # a profiler that cannot start (another one running in this process, ...)
                self._reset()
                logger.exception("profiling could not start")
                return False, f"the profiler could not start: {type(e).__name__}: {e}"
        steps = f"{req.num_steps} steps" if req.num_steps else "until /stop_profile"
        when = "now" if self._prof is not None else f"at step {self._start_at} (now {self.steps})"
        recorded = ["GPU" if a == torch.profiler.ProfilerActivity.CUDA else "CPU" for a in self._activities(req)]
        logger.info("profiling %s from %s (%s), traces to %s", steps, when, ", ".join(recorded), req.output_dir)
        return True, ""

    def stop(self) -> tuple[bool, str]:
        """Ends the profile now: every rank of the group writes its trace if any step was recorded. (True, the
        traces' paths, one a line; "" without any), or (False, why not)."""
        if self._req is None:
            return False, "Profiling is not in progress. Call /start_profile first."
        if self._prof is None:
            self._req, self.active = None, False
            logger.info("profiling stopped before its first step: nothing recorded")
            return True, ""
        try:
            return True, "\n".join(self._finish())
        except Exception as e:
            self._reset()
            logger.exception("profiling could not stop cleanly")
            return False, f"the profiler failed to stop: {type(e).__name__}: {e}"

    def after_step(self) -> None:
        """Called by the leader after every step that ran a forward (cheap unless ``active``)."""
        self.steps += 1
        if not self.active:
            return
        try:
            if self._prof is None:
                if self.steps >= self._start_at:
                    self._begin()
                return
            self._recorded += 1
            assert self._req is not None
            if self._req.num_steps and self._recorded >= self._req.num_steps:
                self._finish()
            elif self._recorded % LONG_PROFILE_STEPS == 0:
                logger.warning("profiling has recorded %d steps over %.0f s and goes on until /stop_profile: it slows "
                               "this server and its trace grows in memory", self._recorded,
                               time.monotonic() - self._began)  # fmt: skip
        except Exception:  # profiling is a diagnostic: its failure must not fail the step's requests
            self._reset()
            logger.exception("profiling failed and was stopped")

    def step_range(self) -> contextlib.AbstractContextManager[Any]:
        """Wraps one engine step: while recording, a range named "engine step N" in the trace (where each step
        begins and ends on the host); otherwise nothing."""
        if self._prof is None:
            return contextlib.nullcontext()
        return torch.profiler.record_function(f"{STEP_RANGE} {self.steps}")

    def follow(self, msg: dict[str, Any]) -> None:
        """A follower's side of the leader's "profile" message: start with it, or stop, write this rank's trace and
        tell the leader where (whatever happened: the leader waits for every rank's answer)."""
        if msg["action"] == "start":
            self._failed = ""
            try:
                self._req, self.active = from_dict(msg["request"]), True
                os.makedirs(self._req.output_dir, exist_ok=True)  # (a follower on another node than its leader)
                self._begin()
            except Exception as e:  # a diagnostic: the follower goes on with the forwards, and says so at the stop
                self._reset()
                self._failed = f"{self.rank_tag} could not start: {type(e).__name__}: {e}"
                logger.exception("profiling could not start on this rank")
            return
        path, error = "", self._failed
        try:
            if self._prof is not None:
                path = self._write()
        except Exception as e:
            self._reset()
            error = f"{self.rank_tag}: {type(e).__name__}: {e}"
            logger.exception("writing this rank's trace failed")
        assert self.sync is not None
        self.sync.gather({"trace": path, "error": error})

    def _begin(self) -> None:
        assert self._req is not None
        self._prof = torch.profiler.profile(activities=self._activities(self._req), with_stack=self._req.with_stack,
                                            record_shapes=self._req.record_shapes)  # fmt: skip
        self._sync()  # what the device still runs from earlier steps stays out of the profile's first step
        self._prof.start()
        self._began = time.monotonic()
        if self.sync is not None and self.sync.is_leader:
            self.sync.send({"op": "profile", "action": "start", "request": to_dict(self._req)})

    def _finish(self) -> list[str]:
        """The leader's end of a profile: the followers are told, every rank writes its trace; their paths in the
        group's rank order.

        Raises:
            RuntimeError: a rank's trace could not be written (the others are written).
        """
        if self.sync is None:
            return [self._write()]
        self.sync.send({"op": "profile", "action": "stop"})
        path, error = "", ""
        try:
            path = self._write()
        except Exception as e:  # the followers still answer below: they wait on this rank's gather
            self._reset()
            error = f"{self.rank_tag}: {type(e).__name__}: {e}"
        answers = self.sync.gather({"trace": path, "error": error})
        errors = [a["error"] for a in answers if a["error"]]
        if errors:
            raise RuntimeError("; ".join(errors))
        return [a["trace"] for a in answers if a["trace"]]

    def _write(self) -> str:
        """Stops recording, writes this rank's trace, logs what the device did; returns the trace's path."""
        assert self._prof is not None and self._req is not None
        prof, req, recorded, wall = self._prof, self._req, self._recorded, time.monotonic() - self._began
        self._prof, self._req, self.active = None, None, False
        self._sync()  # the last step's kernels are in the trace (overlap scheduling may still be running them)
        prof.stop()
        name = f"{req.prefix + '-' if req.prefix else ''}{req.profile_id}-{self.rank_tag}.trace.json.gz"
        path = os.path.join(req.output_dir, name)
        written = time.monotonic()
        prof.export_chrome_trace(path)
        summary = device_summary(prof)
        logger.info("profile of %d steps over %.1f ms written to %s (%.1f MB, in %.1f s)%s", recorded, wall * 1e3,
                    path, os.path.getsize(path) / 1e6, time.monotonic() - written,
                    f"; {summary}" if summary else "")  # fmt: skip
        return path

    def _reset(self) -> None:
        prof, self._prof, self._req, self.active = self._prof, None, None, False
        if prof is not None:
            try:
                prof.stop()
            except Exception:  # it may never have started
                pass

    def _activities(self, req: ProfileRequest) -> list[torch.profiler.ProfilerActivity]:
        """What torch.profiler records for ``req`` here (GPU events on a CUDA device only)."""
        activities = [torch.profiler.ProfilerActivity.CPU] if "CPU" in req.activities else []
        if "GPU" in req.activities and self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        return activities

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def kernel_timeline(prof: torch.profiler.profile) -> dict[str, float]:
    """The profiled device activity in time: kernels, their summed time, the span from the first one's start to the
    last one's end, and the idle time between them (launch gaps, and the host making the device wait)."""
    return _timeline([(e.time_range.start, e.time_range.end) for e in _device_events(prof)])


def trace_device_events(path: str) -> list[tuple[str, float, float]]:
    """A written trace's (a .trace.json.gz of /stop_profile) kernels, copies and memsets: (name, start us, duration
    us)."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        events = json.load(f)["traceEvents"]
    return [(str(e.get("name", "?")), float(e["ts"]), float(e["dur"])) for e in events
            if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES and float(e.get("dur", 0)) > 0]  # fmt: skip


def trace_timeline(events: list[tuple[str, float, float]]) -> dict[str, float]:
    """``kernel_timeline`` of a written trace's device events (``trace_device_events``)."""
    return _timeline([(start, start + dur) for _, start, dur in events])


def _timeline(spans: list[tuple[float, float]]) -> dict[str, float]:
    """Device spans (start, end) in microseconds -> kernels, busy_ms, span_ms, idle_ms, gap_us_median."""
    spans = sorted(spans)
    if not spans:
        return {}
    busy, idle, reach = 0.0, [], spans[0][0]
    for start, stop in spans:
        if start > reach:
            idle.append(start - reach)
        busy += max(0.0, stop - max(start, reach))
        reach = max(reach, stop)
    return {"kernels": len(spans), "busy_ms": busy / 1e3, "span_ms": (reach - spans[0][0]) / 1e3,
            "idle_ms": sum(idle) / 1e3, "gap_us_median": statistics.median(idle) if idle else 0.0}  # fmt: skip


def idle_spells(prof: torch.profiler.profile, count: int) -> list[dict[str, Any]]:
    """The ``count`` longest spells with no kernel running, in time order: when each began (ms from the first
    kernel), how long it lasted, and the kernels either side of it (which say where the device waited)."""
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in _device_events(prof))
    if not kernels:
        return []
    spells, reach, last = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > reach:
            spells.append((start - reach, reach, last, name))
        if stop > reach:
            reach, last = stop, name
    longest = sorted(spells, reverse=True)[:count]
    return [{"at_ms": round((at - kernels[0][0]) / 1e3, 3), "idle_ms": round(idle / 1e3, 3), "after": before[:80],
             "before": after[:80]} for idle, at, before, after in sorted(longest, key=lambda g: g[1])]  # fmt: skip


def device_summary(prof: torch.profiler.profile) -> str:
    """One line on the device's time in a profile ("" without device events)."""
    t = kernel_timeline(prof)
    if not t:
        return ""
    longest = sorted(idle_spells(prof, LOGGED_IDLE_SPELLS), key=lambda g: -g["idle_ms"])
    spells = ", ".join(f"{g['idle_ms']:.2f} ms at {g['at_ms']:.1f} ms before {g['before']}" for g in longest)
    return (f"device busy {t['busy_ms']:.1f} ms of a {t['span_ms']:.1f} ms span ({int(t['kernels'])} device events, "
            f"idle {t['idle_ms']:.1f} ms; longest idle: {spells or 'none'})")


def _device_events(prof: torch.profiler.profile) -> list[Any]:
    """The profile's kernels, copies and memsets: its device events without the ranges that record_function
    projects onto the device's timeline (an "engine step N" spans the step's kernels and the gaps between them)."""
    return [e for e in prof.events() if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith(STEP_RANGE)]  # fmt: skip
