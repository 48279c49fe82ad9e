"""The PD deployment this package's suites attack, and what every suite checks it with.

The deployment: a prefill and a decode `pd serve` instance (tiny Qwen3-MoE checkpoint, CPU, KV over Mooncake/TCP)
behind `pd lb`, started once for the package (starting processes is the slow part). Short bootstrap and transfer
timeouts and a short context bound how long any request may take, so a hang shows up as a client timeout. The
oracle is transformers' greedy decoding of the same checkpoint.

Besides its own properties, every suite checks: probes (well-formed greedy requests sent through the balancer on a
thread, for as long as the attack runs) all get the oracle's tokens; afterwards no process has died or logged a
traceback, the balancer still has both instances in rotation, and every KV page is free again.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import torch
from hypothesis import HealthCheck, Phase, settings

from decode.scheduler import QUARANTINE_S
from tests.pd_cluster import Cluster
from tests.tiny_checkpoints import VOCAB, load_hf

# Fixed, unlike most tests here: hypothesis replays the same examples every run (derandomize), and a failure should
# replay against the same weights.
CHECKPOINT_SEED = 1512
CONTEXT = 256  # tokens: the longest generation a fuzzed body can ask for is short
TIMEOUT_S = 5.0  # --disaggregation-bootstrap-timeout and --disaggregation-transfer-timeout
INSTANCE_ARGS = ("--chunked-prefill-size", "32", "--page-size", "4", "--context-length", str(CONTEXT),
                 "--disaggregation-bootstrap-timeout", str(TIMEOUT_S),
                 "--disaggregation-transfer-timeout", str(TIMEOUT_S))  # fmt: skip
# The longest any request may take: a bootstrap and a transfer that both time out, then a whole context of tokens.
REQUEST_DEADLINE_S = 2 * TIMEOUT_S + 20
# Decode keeps the pages of a transfer that failed in flight for QUARANTINE_S after the transfer timeout.
PAGES_DEADLINE_S = QUARANTINE_S + TIMEOUT_S + 10
PROBE_NEW_TOKENS = 8

# Every fuzz test: the same examples every run (CI reproducible, so "found nothing" is about known inputs), no
# database, no per-example deadline (each request has its own timeout, which is what catches a hang), and no
# shrinking: against live servers it could run for minutes, so the first failing example is reported as drawn.
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


class Oracle:
    """transformers' greedy tokens for a prompt (no EOS in the checkpoint: always `n` tokens), memoised."""

    def __init__(self, model_path: str) -> None:
        from transformers import AutoTokenizer

        self.model = load_hf(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(self, ids: list[int], n: int) -> list[int]:
        key = (tuple(ids), n)
        if key not in self._cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # beside three server processes, more threads only wait for each other
            try:
                mask = torch.ones(1, len(ids), dtype=torch.long)
                with torch.no_grad():
                    out = self.model.generate(
                        torch.tensor([ids]), attention_mask=mask, max_new_tokens=n, do_sample=False
                    )
            finally:
                torch.set_num_threads(threads)
            self._cache[key] = out[0, len(ids) :].tolist()
        return self._cache[key]


def probe_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(CHECKPOINT_SEED)
    return [torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in (5, 11, 37, 70)]


def generate_ids(client: httpx.Client, url: str, ids: list[int], n: int, stream: bool) -> tuple[int, list[int], str]:
    """POST a greedy /generate; (status, output_ids, error text). A streamed answer's ids are its last event's."""
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0.0}, "stream": stream}
    if not stream:
        r = client.post(url + "/generate", json=body)
        return r.status_code, r.json()["output_ids"] if r.status_code == 200 else [], r.text
    out: list[int] = []
    with client.stream("POST", url + "/generate", json=body) as r:
        if r.status_code != 200:
            return r.status_code, [], r.read().decode(errors="replace")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    return 200, out, line
                out = event["output_ids"]
    return 200, out, ""


class Probe:
    """Well-formed greedy requests through the balancer, one after another on a thread (alternately streamed), for as
    long as the `with` block runs. `check()` asserts that there were some and each got the oracle's tokens."""

    def __init__(self, url: str, oracle: Oracle) -> None:
        self.url = url
        self.prompts = probe_prompts()
        self.expected = [oracle.greedy(p, PROBE_NEW_TOKENS) for p in self.prompts]
        self.answers: list[tuple[list[int], int, list[int], str]] = []  # (prompt, status, output ids, error text)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=REQUEST_DEADLINE_S) as client:
            i = 0
            while not self._stop.is_set():
                ids = self.prompts[i % len(self.prompts)]
                try:
                    status, out, text = generate_ids(client, self.url, ids, PROBE_NEW_TOKENS, stream=i % 2 == 1)
                except httpx.HTTPError as e:
                    status, out, text = 0, [], f"{type(e).__name__}: {e}"
                self.answers.append((ids, status, out, text))
                i += 1

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(REQUEST_DEADLINE_S + 5)

    def check(self) -> None:
        assert self.answers, "no probe request completed"
        for ids, status, out, text in self.answers:
            want = self.expected[self.prompts.index(ids)]
            assert (status, out) == (200, want), f"probe of a {len(ids)}-token prompt: {status} {out} {text[:500]}"


@dataclass
class LogMarks:
    """Where each process log ended when a test began, so a test only answers for the lines it caused."""

    cluster: Cluster
    offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = {p.name: len(p.log()) for p in self.cluster.procs()}

    def new_lines(self, name: str) -> str:
        proc = next(p for p in self.cluster.procs() if p.name == name)
        return proc.log()[self.offsets[name] :]


def assert_alive(cluster: Cluster) -> None:
    dead = [f"{p.name} exited with {p.popen.returncode}:\n{p.log()[-4000:]}" for p in cluster.procs()
            if p.popen.poll() is not None]  # fmt: skip
    assert not dead, "\n".join(dead)


def pages(url: str) -> tuple[int, int]:
    info = httpx.get(url + "/get_server_info", timeout=10).json()
    return int(info["kv_pages_free"]), int(info["kv_pages_total"])


def assert_cluster_whole(cluster: Cluster, marks: LogMarks) -> None:
    """No process died or logged a traceback since `marks`, both instances are in the balancer's rotation, and every
    KV page of both instances is free again (waiting out decode's quarantine of pages a failed transfer touched)."""
    assert_alive(cluster)
    for p in cluster.procs():
        new = marks.new_lines(p.name)
        assert "Traceback" not in new, f"{p.name} logged:\n{new[max(new.find('Traceback') - 500, 0) :][:6000]}"
    listing = httpx.get(cluster.url + "/list_workers", timeout=10).json()
    assert [w["healthy"] for w in listing["prefill"] + listing["decode"]] == [True, True], listing
    instances = [p.url for p in cluster.prefill + cluster.decode]
    deadline = time.monotonic() + PAGES_DEADLINE_S
    while (now := {u: pages(u) for u in instances}) and any(free != total for free, total in now.values()):
        assert time.monotonic() < deadline, f"KV pages (free, total) still taken after {PAGES_DEADLINE_S:.0f} s: {now}"
        time.sleep(0.5)


class Watch:
    """`with watch:` around an attack: probes run through it, then the whole-cluster checks follow (unless the block
    failed on its own)."""

    def __init__(self, cluster: Cluster, oracle: Oracle) -> None:
        self.cluster = cluster
        self.probe = Probe(cluster.url, oracle)
        self.marks = LogMarks(cluster)

    def __enter__(self) -> Watch:
        self.probe.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.probe.__exit__()
        if exc_type is None:
            self.probe.check()
            assert_cluster_whole(self.cluster, self.marks)
