"""Starts `pd serve` (or any `pd` subcommand) as a real subprocess for end-to-end tests, or its front in the test's
own event loop over a real engine (``in_process_front``)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from launch.up import die_with_parent

# One client for the polls of every helper: httpx.get builds a client per call, SSL context included (~25 ms of
# CPU each), and polling several starting servers every 0.1 s that way took a quarter to half of one of this
# machine's two cores from the servers' start-up. No keep-alive: each poll is a fresh connection, as before.
HTTP = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def process_alive(pid: int) -> bool:
    """Running, or stopped; a zombie has ended (whoever adopted it reaps it). Linux (/proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_dist_init_addr() -> str:
    """A loopback --dist-init-addr whose port and port + 1 are both free: a multi-node instance listens on both
    (the rendezvous, and the HTTP front's link to other nodes' DP leaders)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return f"127.0.0.1:{port}"


@contextlib.contextmanager
def healthy_process(
    command: list[str], port: int, health_path: str = "/health", timeout: float = 180.0,
    env: dict[str, str] | None = None, log_path: str | None = None, cwd: str | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:  # fmt: skip
    """Runs `command` (a server listening on `port`; in `cwd` if given), waits until GET health_path answers 200,
    yields the base URL and the process, then stops it (SIGTERM: a profiler around the server still writes its
    output). On a start-up failure the process log is part of the error; log_path keeps the log there (else it is
    deleted)."""
    log = open(log_path, "w+") if log_path else tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    # The server dies with this process however it dies: a test run killed by a timeout (SIGTERM, SIGKILL) must not
    # leave its servers on a GPU, under whatever runs next there.
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(), cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if HTTP.get(url + health_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"`{' '.join(command)}` did not become healthy:\n{log.read()[-4000:]}")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if not log_path:
            os.unlink(log.name)


@contextlib.contextmanager
def pd_process(
    args: list[str], port: int, health_path: str = "/health", timeout: float = 180.0, log_path: str | None = None
) -> Iterator[str]:
    """Runs `python -m pd ARGS`, waits until GET health_path answers 200, yields the base URL, then stops it (its
    log kept at log_path if given)."""
    command = [sys.executable, "-m", "pd", *args]
    with healthy_process(command, port, health_path, timeout, log_path=log_path) as (url, _):
        yield url


PORT_ATTEMPTS = 3  # a port free when picked can be taken by another process before the server binds it


@contextlib.contextmanager
def pd_serve(model_path: str, *extra: str) -> Iterator[str]:
    """`pd serve` on a free port; started again on another port if the picked one was taken meanwhile."""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        args = ["serve", "--model-path", model_path, "--device", "cpu", "--dtype", "float32", "--port", str(port),
                *extra]  # fmt: skip
        with contextlib.ExitStack() as stack:
            try:
                url = stack.enter_context(pd_process(args, port))
            except RuntimeError as e:
                if "address already in use" in str(e) and attempt + 1 < PORT_ATTEMPTS:
                    continue
                raise
            yield url
            return


def listeners(port: int) -> int:
    """TCP sockets listening on ``port`` (IPv4 and IPv6), from /proc/net (Linux)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as f:
                rows = [row.split() for row in f.read().splitlines()[1:]]
            count += sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")
    return count


@contextlib.asynccontextmanager
async def in_process_front(args: Any, tokenizer: Any, make_scheduler: Any = None) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP front of the instance ServerArgs ``args`` describe, in the running event loop, over its real engine
    (rank processes started and stopped here; ``make_scheduler``: a SchedulerFactory other than the default, a
    module-level function the rank processes import): an httpx client to it."""
    from pd.engine.client import EngineClient
    from pd.engine.spec import EngineSpec
    from pd.server.app import create_app

    spec = EngineSpec.from_server_args(args, make_scheduler) if make_scheduler else EngineSpec.from_server_args(args)
    engine = EngineClient(args, spec)
    await engine.start()
    try:
        app = create_app(engine, tokenizer, args)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=120) as client:
            yield client
    finally:
        await engine.close()
