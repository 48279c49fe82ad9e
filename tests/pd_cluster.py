"""A PD deployment for end-to-end tests: prefill and decode `pd serve` instances plus a load balancer (ours or
sglang-router), each a real subprocess on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from tests.server_process import HTTP, free_dist_init_addr, free_port


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(10)


@dataclass
class Cluster:
    url: str  # the load balancer
    prefill: list[Proc] = field(default_factory=list)
    decode: list[Proc] = field(default_factory=list)
    lb: Proc | None = None
    bootstrap_ports: list[int] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)  # nodes > 0 of multi-node instances (no HTTP front)

    def procs(self) -> list[Proc]:
        return self.prefill + self.decode + self.workers + ([self.lb] if self.lb else [])

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log()[-3000:]}" for p in self.procs())


def start_proc(name: str, argv: list[str], url: str, health: str = "/health",
               env_extra: dict[str, str] | None = None) -> Proc:
    log = tempfile.NamedTemporaryFile("w", suffix=f"-{name}.log", delete=False)
    # Several instances share this machine's cores: one OpenMP thread each unless the caller chose otherwise.
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    env.setdefault("OMP_NUM_THREADS", "1")
    popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    return Proc(name, url, popen, log.name)


def wait_healthy(procs: list[Proc], timeout: float = 180.0, path: str = "/health") -> None:
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for p in list(pending):
            if p.popen.poll() is not None:
                raise RuntimeError(f"{p.name} exited with {p.popen.returncode}:\n{p.log()[-4000:]}")
            try:
                if HTTP.get(p.url + path, timeout=2).status_code == 200:
                    pending.remove(p)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError("not healthy: " + ", ".join(p.name for p in pending)
                               + "\n" + "\n".join(p.log()[-3000:] for p in pending))
        time.sleep(0.1)


def serve_argv(model_path: str, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pd", "serve", "--model-path", model_path, "--device", "cpu", "--dtype", "float32",
            "--port", str(port), *extra]


# A port free when picked can be taken before the instance binds it (other tests' listeners bind port 0, which
# draws from the same ephemeral range): the cluster is then started again on fresh ports.
CLUSTER_ATTEMPTS = 3
_PORT_TAKEN = ("address already in use", "Address already in use", "given more than once")


@contextlib.contextmanager
def pd_cluster(
    model_path: str,
    num_prefill: int = 1,
    num_decode: int = 1,
    router: str = "pd",  # "pd" (our load balancer) or "sglang" (sglang-router)
    instance_args: tuple[str, ...] = (),
    prefill_args: tuple[str, ...] = (),
    decode_args: tuple[str, ...] = (),
    lb_args: tuple[str, ...] = (),
    prefill_nodes: int = 1,  # > 1: each prefill instance spans this many "nodes" (processes) on this machine
    decode_env: dict[str, str] | None = None,  # more environment for the decode instances' processes
) -> Iterator[Cluster]:
    for attempt in range(CLUSTER_ATTEMPTS):
        cluster = Cluster(url="")
        try:
            _start(cluster, model_path, num_prefill, num_decode, router, instance_args, prefill_args, decode_args,
                   lb_args, prefill_nodes, decode_env)  # fmt: skip
        except RuntimeError as e:
            _stop(cluster)
            if attempt + 1 < CLUSTER_ATTEMPTS and any(m in str(e) for m in _PORT_TAKEN):
                continue
            raise
        break
    try:
        yield cluster
    finally:
        _stop(cluster)


def _unique_port(taken: set[int]) -> int:
    while (port := free_port()) in taken:
        pass
    taken.add(port)
    return port


def _start(cluster: Cluster, model_path: str, num_prefill: int, num_decode: int, router: str,
           instance_args: tuple[str, ...], prefill_args: tuple[str, ...], decode_args: tuple[str, ...],
           lb_args: tuple[str, ...], prefill_nodes: int, decode_env: dict[str, str] | None = None) -> None:  # fmt: skip
    taken: set[int] = set()
    for i in range(num_prefill):
        port, bport = _unique_port(taken), _unique_port(taken)
        cluster.bootstrap_ports.append(bport)
        args = ("--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bport), *instance_args,
                *prefill_args)  # fmt: skip
        if prefill_nodes > 1:
            args += ("--nnodes", str(prefill_nodes), "--dist-init-addr", free_dist_init_addr())
        url = f"http://127.0.0.1:{port}"
        cluster.prefill.append(start_proc(f"prefill-{i}", serve_argv(model_path, port, *args), url))
        for node in range(1, prefill_nodes):
            cluster.workers.append(start_proc(f"prefill-{i}-node{node}", serve_argv(
                model_path, _unique_port(taken), *args, "--node-rank", str(node)), url))  # fmt: skip
    for j in range(num_decode):
        port = _unique_port(taken)
        cluster.decode.append(start_proc(
            f"decode-{j}",
            serve_argv(model_path, port, "--disaggregation-mode", "decode", *instance_args, *decode_args),
            f"http://127.0.0.1:{port}", env_extra=decode_env,
        ))
    wait_healthy(cluster.prefill + cluster.decode)
    lb_port = _unique_port(taken)
    if router == "pd":
        argv = [sys.executable, "-m", "pd", "lb", "--port", str(lb_port), "--health-check-interval", "1"]
    else:
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation", "--host",
                "127.0.0.1", "--port", str(lb_port), "--policy", "round_robin",
                # its Prometheus exporter binds 29000 by default: two routers on one machine would collide
                "--prometheus-port", str(_unique_port(taken))]
    for p, bport in zip(cluster.prefill, cluster.bootstrap_ports, strict=True):
        argv += ["--prefill", p.url, str(bport)]
    for p in cluster.decode:
        argv += ["--decode", p.url]
    cluster.lb = start_proc("lb", [*argv, *lb_args], f"http://127.0.0.1:{lb_port}")
    cluster.url = cluster.lb.url
    wait_healthy([cluster.lb], timeout=60)


def _stop(cluster: Cluster) -> None:
    stop_procs(cluster.procs())


def stop_procs(procs: list[Proc]) -> None:
    """Terminates every process at once, then waits for each (killing one that hangs) and deletes its log."""
    for p in procs:
        if p.popen.poll() is None:
            p.popen.terminate()
    for p in procs:
        try:
            p.popen.wait(20)
        except subprocess.TimeoutExpired:
            p.popen.kill()
        if os.path.exists(p.log_path):
            os.unlink(p.log_path)


def kv_pages_free(url: str) -> int:
    return int(HTTP.get(f"{url}/get_server_info", timeout=10).json()["kv_pages_free"])
