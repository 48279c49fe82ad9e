"""`pd up`: a whole PD deployment on this machine: prefill instances, decode instances and the load balancer.

Every `pd serve` flag not listed here is passed to each instance (e.g. --device, --dtype, --page-size). Ports:
the load balancer listens on --port; prefill i serves HTTP on --port + 1 + i and bootstrap on
--bootstrap-port + i; decode j serves HTTP on --port + 1 + num_prefill + j. Children's logs are printed with a
prefix. Ctrl-C or SIGTERM stops every child; if one child dies, the others are stopped too.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from pd.server_args import ServerArgs, ServerArgsError

logger = logging.getLogger("pd.up")


@dataclass(frozen=True)
class Child:
    name: str
    url: str
    proc: subprocess.Popen[bytes]


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prefill", type=int, default=1, help="prefill instances (default 1)")
    parser.add_argument("--num-decode", type=int, default=1, help="decode instances (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address every process binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="load balancer port (default 30000)")
    parser.add_argument("--bootstrap-port", type=int, default=8998, help="first prefill bootstrap port")
    parser.add_argument("--policy", default="power_of_two", choices=["random", "round_robin", "power_of_two"])
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for health")


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _pipe_output(name: str, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
        sys.stdout.flush()


def _spawn(name: str, args: list[str], url: str, threads: int | None = None) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        # Instances share the machine's cores; OpenMP pools that each take every core stall one another.
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pd", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    threading.Thread(target=_pipe_output, args=(name, proc), daemon=True).start()
    return Child(name, url, proc)


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + 20
    for child in children:
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in time; killing it", child.name)
            child.proc.kill()


def _wait_healthy(children: list[Child], timeout: float) -> str | None:
    """None once every child answers /health with 200; else why not."""
    deadline = time.monotonic() + timeout
    pending = list(children)
    while pending:
        for child in list(pending):
            if child.proc.poll() is not None:
                return f"{child.name} exited with code {child.proc.returncode} during start-up (its log is above)"
            try:
                if httpx.get(f"{child.url}/health", timeout=2).status_code == 200:
                    pending.remove(child)
                    logger.info("%s is healthy at %s", child.name, child.url)
            except httpx.HTTPError:
                pass
        if time.monotonic() > deadline:
            return f"not healthy after {timeout:.0f} s: {', '.join(c.name for c in pending)}"
        time.sleep(0.5)
    return None


def run_up(ns: argparse.Namespace, serve_argv: Sequence[str]) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polling is not news
    if ns.num_prefill < 1 or ns.num_decode < 1:
        print("pd up: --num-prefill and --num-decode must be >= 1", file=sys.stderr)
        return 2
    try:  # validate the instance flags once, before anything starts
        args = ServerArgs.from_cli([*serve_argv, "--disaggregation-mode", "prefill"], prog="pd up")
    except ServerArgsError as e:
        print(f"pd up: {e}", file=sys.stderr)
        return 2
    serve_argv = list(serve_argv)
    if args.model_path is None:
        from pd.default_model import build_default_model

        serve_argv += ["--model-path", build_default_model()]  # once here, not raced by every instance

    host = ns.host
    prefill_ports = [ns.port + 1 + i for i in range(ns.num_prefill)]
    bootstrap_ports = [ns.bootstrap_port + i for i in range(ns.num_prefill)]
    decode_ports = [ns.port + 1 + ns.num_prefill + j for j in range(ns.num_decode)]
    busy = [p for p in [ns.port, *prefill_ports, *bootstrap_ports, *decode_ports] if not _port_free(host, p)]
    if busy:
        print(f"pd up: ports already in use on {host}: {busy}; choose --port / --bootstrap-port", file=sys.stderr)
        return 2

    children: list[Child] = []
    stopping = threading.Event()
    # Every rank process of every instance shares this machine's cores.
    threads = max(1, (os.cpu_count() or 1) // ((ns.num_prefill + ns.num_decode) * args.tp_size))

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i, (port, bport) in enumerate(zip(prefill_ports, bootstrap_ports, strict=True)):
            children.append(
                _spawn(
                    f"prefill-{i}",
                    [
                        "serve",
                        *serve_argv,
                        "--disaggregation-mode",
                        "prefill",
                        "--host",
                        host,
                        "--port",
                        str(port),
                        "--disaggregation-bootstrap-port",
                        str(bport),
                    ],
                    f"http://{host}:{port}",
                    threads,
                )
            )
        for j, port in enumerate(decode_ports):
            children.append(
                _spawn(
                    f"decode-{j}",
                    ["serve", *serve_argv, "--disaggregation-mode", "decode", "--host", host, "--port", str(port)],
                    f"http://{host}:{port}",
                    threads,
                )
            )
        lb_args = ["lb", "--host", host, "--port", str(ns.port), "--policy", ns.policy]
        for port, bport in zip(prefill_ports, bootstrap_ports, strict=True):
            lb_args += ["--prefill", f"http://{host}:{port}", str(bport)]
        for port in decode_ports:
            lb_args += ["--decode", f"http://{host}:{port}"]
        if args.api_key:
            lb_args += ["--api-key", args.api_key]
        error = _wait_healthy(children, ns.start_timeout)
        if error is None:
            children.append(_spawn("lb", lb_args, f"http://{host}:{ns.port}"))
            error = _wait_healthy(children[-1:], 60)
        if error is not None:
            print(f"pd up: {error}", file=sys.stderr)
            return 1
        url = f"http://{host}:{ns.port}"
        print(
            f"\nPD cluster ready: {ns.num_prefill} prefill + {ns.num_decode} decode behind {url}\n"
            f"Try:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
            '\'{"messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 32}\'\n'
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.wait(1.0):
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                print(
                    f"pd up: {dead[0].name} exited with code {dead[0].proc.returncode}; stopping the rest",
                    file=sys.stderr,
                )
                return 1
        print("pd up: stopping", flush=True)
        return 0
    finally:
        _stop(children)
