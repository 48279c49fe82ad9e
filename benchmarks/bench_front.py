"""How many tokens per second the HTTP front of `pd serve` can stream, apart from the model.

`pd serve` runs as usual (front, engine process, engine loop, pipes, detokenizer, SSE), except that the model's
forward is replaced by a paced stand-in: every --step-ms each running request gets one token (ids of printable
bytes of a byte-level tokenizer, so detokenization does its real work). The clients are bare asyncio readers
(bench_gpu_serve's), so they cost little next to the server.

Printed per batch, measured in the same run:
- emitted: tokens per second the stand-in engine produced (batch / step, when the front keeps up);
- received: tokens per second the clients got; received / emitted is 1.0 while the front keeps up;
- CPU per token: of the front's processes (user + system, from /proc), of the engine's rank processes (the stand-in
  step, scheduling and sending outputs to the fronts; "busy" is its CPU over the run's time: near 100% the engine
  loop itself cannot keep the pace) and of this benchmark's client, per streamed token. A real server's decode is
  bounded by the front once batch x the front's figure exceeds the device's step time (on one H200, a 64-request
  FP8 step of Qwen3-30B-A3B widths takes ~1.9 ms: 30 us per token).

Usage: python benchmarks/bench_front.py [--batches 16,64,256] [--new-tokens 256] [--step-ms 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pd.engine.io import EngineStats, GenerateRequest, TokenOutput  # noqa: E402

# Byte-level tokenizer ids of letters and spaces (tests/tiny_checkpoints.write_tokenizer maps printable ASCII
# bytes to themselves): text a detokenizer handles like any word pieces.
TEXT_IDS = [32, *range(97, 123)]


class PacedScheduler:
    """Stands in for the engine's scheduler: one token per running request every `step_s` seconds."""

    def __init__(self, max_running: int, step_s: float, runner: Any) -> None:
        self.runner, self.step_s, self.max_running = runner, step_s, max_running
        self.waiting: list[GenerateRequest] = []
        self.running: dict[str, list[Any]] = {}  # rid -> [request, tokens so far]
        self.next_step = 0.0
        self.generated = self.prompt_tokens = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    needs_compute = has_work

    def add(self, req: GenerateRequest) -> TokenOutput | None:
        self.waiting.append(req)
        self.prompt_tokens += len(req.input_ids)
        return None

    def abort(self, rid: str) -> TokenOutput | None:
        self.waiting = [r for r in self.waiting if r.rid != rid]
        entry = self.running.pop(rid, None)
        return None if entry is None else TokenOutput(rid, [], len(entry[0].input_ids), entry[1], "abort")

    def flush_cache(self) -> int:
        return 0

    def live_requests(self) -> list[Any]:
        return []

    def stats(self) -> EngineStats:
        return EngineStats(len(self.waiting), len(self.running), 1 << 16, 1 << 16, 16, self.generated,
                           self.prompt_tokens)  # fmt: skip

    untidy = False  # nothing is left for after the outputs

    def tidy(self) -> bool:  # nothing is left for after the outputs
        return False

    def step(self, tidy: bool = True) -> list[TokenOutput]:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting.pop(0)
            self.running[req.rid] = [req, 0]
        now = time.monotonic()
        if self.next_step > now:
            time.sleep(self.next_step - now)
        self.next_step = max(self.next_step, now) + self.step_s
        outputs = []
        for rid, entry in list(self.running.items()):
            req, n = entry
            n = entry[1] = n + 1
            self.generated += 1
            done = n >= req.sampling.max_new_tokens
            token = TEXT_IDS[(n * 7 + len(rid)) % len(TEXT_IDS)]
            if done:
                del self.running[rid]
            if done or req.every_token or n == 1:
                outputs.append(TokenOutput(rid, [token], len(req.input_ids), n, "length" if done else None))
        return outputs


def paced_scheduler(cfg: Any, runner: Any, disagg: Any = None) -> PacedScheduler:
    """The SchedulerFactory the served instance uses (a module-level function: rank processes import it)."""
    return PacedScheduler(cfg.max_running_requests, float(os.environ["PD_BENCH_FRONT_STEP_S"]), runner)


def serve(argv: list[str]) -> None:
    """The server child: `pd serve` ARGV with the paced stand-in."""
    from pd.engine.spec import EngineSpec
    from pd.server.app import run_server
    from pd.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = ServerArgs.from_namespace(parser.parse_args(argv))
    run_server(args, EngineSpec.from_server_args(args, paced_scheduler))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (name, parent pid) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    name, rest = f.read().split(" (", 1)[1].rsplit(")", 1)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            table[int(entry)] = (name, int(rest.split()[1]))
    return table


def front_pids(main: int) -> list[int]:
    """The front's processes: `main` and, with --tokenizer-worker-num, its children named pd-front<k>."""
    return [main] + [pid for pid, (name, parent) in _processes().items() if name.startswith("pd-front")
                     and parent == main]  # fmt: skip


def engine_pids() -> list[int]:
    """The engine's rank processes (named pd-rank<k>; their parent may be a fork server, not the server)."""
    return [pid for pid, (name, _) in _processes().items() if name.startswith("pd-rank")]


def run(batches: list[int], new_tokens: int, step_ms: float, fronts: int = 1) -> list[dict[str, float]]:
    from benchmarks.bench_gpu_serve import _serve_load, run_load
    from tests.server_process import free_port, healthy_process
    from tests.tiny_checkpoints import make_checkpoint

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    rows = []
    with tempfile.TemporaryDirectory() as path:
        make_checkpoint("llama", path)
        port = free_port()
        command = [sys.executable, "-m", "benchmarks.bench_front", "--serve", "--model-path", path, "--device", "cpu",
                   "--dtype", "float32", "--port", str(port), "--max-running-requests", str(max(batches)),
                   "--log-level", "warning", "--tokenizer-worker-num", str(fronts)]  # fmt: skip
        # the checkout first, then whatever path the caller's packages come from
        path_now = os.environ.get("PYTHONPATH")
        env = {"PD_BENCH_FRONT_STEP_S": str(step_ms / 1e3),
               "PYTHONPATH": os.pathsep.join([root, path_now]) if path_now else root}  # fmt: skip
        with healthy_process(command, port, env=env) as (url, proc):
            run_load(_serve_load(url, [[1, 2, 3]] * 4, 8))  # warm-up
            for b in batches:
                prompts = [[10 + i, 11, 12] for i in range(b)]
                pids, engine = front_pids(proc.pid), engine_pids()
                cpu0, engine0, client0 = sum(map(cpu_seconds, pids)), sum(map(cpu_seconds, engine)), time.process_time()
                elapsed, arrivals = run_load(_serve_load(url, prompts, new_tokens))
                client = time.process_time() - client0
                cpu, engine_cpu = sum(map(cpu_seconds, pids)) - cpu0, sum(map(cpu_seconds, engine)) - engine0
                tokens, emitted = b * new_tokens, b / (step_ms / 1e3)
                received, events = tokens / elapsed, sum(len(a) for a in arrivals)
                row = {"batch": b, "emitted_tok_s": emitted, "received_tok_s": received,
                       "received_vs_emitted": received / emitted, "front_cpu_us_per_token": 1e6 * cpu / tokens,
                       "engine_cpu_us_per_token": 1e6 * engine_cpu / tokens,
                       "client_cpu_us_per_token": 1e6 * client / tokens,
                       "engine_busy": engine_cpu / elapsed, "tokens_per_event": tokens / max(events, 1)}  # fmt: skip
                rows.append(row)
                print(f"batch {b:4d}: emitted {emitted:8.0f} tok/s, received {received:8.0f} tok/s "
                      f"({row['received_vs_emitted']:.2f}x), CPU per token: front {row['front_cpu_us_per_token']:5.1f} "
                      f"us, engine {row['engine_cpu_us_per_token']:5.1f} us (busy {row['engine_busy']:.0%} of a core, "
                      f"its paced sleeps excluded), client {row['client_cpu_us_per_token']:5.1f} us; "
                      f"{row['tokens_per_event']:.2f} tokens/event", flush=True)  # fmt: skip
    return rows


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64,256")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=2.0, help="the stand-in engine's step time")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--fronts", type=int, default=1, help="front processes (pd serve --tokenizer-worker-num)")
    args = parser.parse_args()
    rows = run([int(b) for b in args.batches.split(",")], args.new_tokens, args.step_ms, args.fronts)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"step_ms": args.step_ms, "new_tokens": args.new_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
