"""`pd up`: a whole PD deployment on this machine: prefill instances, decode instances and the load balancer.

Every `pd serve` flag not listed here is passed to each instance (e.g. --device, --dtype, --page-size). Ports:
the load balancer listens on --port; prefill i serves HTTP on --port + 1 + i and bootstrap on
--bootstrap-port + i; decode j serves HTTP on --port + 1 + num_prefill + j. Children's logs are printed with a
prefix. Ctrl-C or SIGTERM stops every child; if one child dies, the others are stopped too.

Each child runs in its own session (process group), so a Ctrl-C reaches `pd up` alone and it stops the children
in order; a child dies with `pd up` even when `pd up` is killed outright (SIGTERM on parent death, Linux). The API
key (--api-key, --api-key-file or PD_API_KEY) reaches the children through PD_API_KEY, never their argv.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from launch.preflight import PreflightError, check_model_files, port_free
from pd.dist.launch import usable_cores
from pd.lb.policies import POLICY_NAMES
from pd.server_args import API_KEY_ENV, ServerArgs, ServerArgsError

logger = logging.getLogger("pd.up")

API_KEY_FLAGS = ("--api-key", "--api-key-file")
# How long serving children get to drain on a stop; children still starting have nothing to drain.
STOP_GRACE_S = 20.0
STARTUP_STOP_GRACE_S = 2.0
_PR_SET_PDEATHSIG = 1

_port_free = port_free  # the tests' name for it


@dataclass(frozen=True)
class Child:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    output: threading.Thread


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prefill", type=int, default=1, help="prefill instances (default 1)")
    parser.add_argument("--num-decode", type=int, default=1, help="decode instances (default 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address every process binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000, help="load balancer port (default 30000)")
    parser.add_argument("--bootstrap-port", type=int, default=8998, help="first prefill bootstrap port")
    parser.add_argument("--policy", default="power_of_two", choices=sorted(POLICY_NAMES),
                        help="how the load balancer picks a prefill and a decode instance for each request: random, "
                             "round_robin (in turn), power_of_two (the less loaded of two random picks), or "
                             "cache_aware (the instance holding the longest prefix of the request) "
                             "(default: %(default)s)")  # fmt: skip
    parser.add_argument("--prefill-policy", choices=sorted(POLICY_NAMES), default=None,
                        help="the policy for prefill instances (default: --policy)")
    parser.add_argument("--decode-policy", choices=sorted(POLICY_NAMES), default=None,
                        help="the policy for decode instances (default: --policy)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for health")


def _pipe_output(name: str, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        sys.stdout.write(f"[{name}] {line.decode(errors='replace')}")
        sys.stdout.flush()


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies, however it dies (Linux; None
    elsewhere). libc is looked up here, in the parent: the forked child only makes the one call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, sig = os.getpid(), int(signal.SIGTERM)

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _spawn(name: str, args: list[str], url: str, env: dict[str, str], threads: int | None = None) -> Child:
    env = dict(env, PYTHONUNBUFFERED="1")
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        # Instances share the machine's cores; OpenMP pools that each take every core stall one another.
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pd", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        start_new_session=True, preexec_fn=die_with_parent(),
    )  # fmt: skip
    output = threading.Thread(target=_pipe_output, args=(name, proc), daemon=True)
    output.start()
    return Child(name, url, proc, output)


def _stop(children: list[Child], grace: float) -> None:
    """SIGTERM to each child, up to `grace` seconds for all to exit, then SIGKILL; last, SIGKILL to what is left
    of each child's process group (its rank processes, when the child died before it could stop them)."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.terminate()
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", child.name, grace)
            child.proc.kill()
            child.proc.wait()
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)


def _wait_healthy(children: list[Child], timeout: float, stopping: threading.Event) -> str | None:
    """None once every child answers /health with 200; else why not (also when `stopping` is set)."""
    deadline = time.monotonic() + timeout
    pending = list(children)
    # One client for every poll: httpx.get would build one, SSL context included, per call (~25 ms of CPU taken
    # from the children's start-up on a small machine).
    with httpx.Client() as client:
        while pending:
            if stopping.is_set():
                return "stopping"
            for child in list(pending):
                if child.proc.poll() is not None:
                    child.output.join(2)  # its last lines first, then the verdict
                    return f"{child.name} exited with code {child.proc.returncode} during start-up (its log is above)"
                try:
                    if client.get(f"{child.url}/health", timeout=1).status_code == 200:
                        pending.remove(child)
                        logger.info("%s is healthy at %s", child.name, child.url)
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                return f"not healthy after {timeout:.0f} s: {', '.join(c.name for c in pending)}"
            stopping.wait(0.5)
    return None


def _without_flags(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """`argv` less every `FLAG VALUE` and `FLAG=VALUE` of `flags`."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif a.split("=", 1)[0] not in flags:
            out.append(a)
    return out


def sample_auth_header(serve_argv: Sequence[str], args: ServerArgs) -> str:
    """The curl `-H` option for the key, as the user gave it: the key itself when it was on the command line, else
    a shell expression that reads it from the file or the environment, so the banner does not print it."""
    if args.api_key is None:
        return ""
    if any(a == "--api-key" or a.startswith("--api-key=") for a in serve_argv):
        return f" -H {shlex.quote(f'Authorization: Bearer {args.api_key}')}"
    if args.api_key_file is not None:
        return f' -H "Authorization: Bearer $(cat {shlex.quote(args.api_key_file)})"'
    return f' -H "Authorization: Bearer ${API_KEY_ENV}"'


def run_up(ns: argparse.Namespace, serve_argv: Sequence[str]) -> int:
    """Start the deployment and serve until Ctrl-C/SIGTERM (exit 0) or a child's death (1); 2 for a usage error
    or a busy port found before anything starts, 128 + signal for an interrupt during start-up."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # health polling is not news
    if ns.num_prefill < 1 or ns.num_decode < 1:
        print("pd up: --num-prefill and --num-decode must be >= 1", file=sys.stderr)
        return 2
    try:  # validate the instance flags once, before anything starts
        args = ServerArgs.from_cli([*serve_argv, "--disaggregation-mode", "prefill"], prog="pd up")
        check_model_files(args)
    except (ServerArgsError, PreflightError) as e:
        print(f"pd up: error: {e}", file=sys.stderr)
        return 2
    host = ns.host
    prefill_ports = [ns.port + 1 + i for i in range(ns.num_prefill)]
    bootstrap_ports = [ns.bootstrap_port + i for i in range(ns.num_prefill)]
    decode_ports = [ns.port + 1 + ns.num_prefill + j for j in range(ns.num_decode)]
    busy = [p for p in [ns.port, *prefill_ports, *bootstrap_ports, *decode_ports] if not port_free(host, p)]
    if busy:
        print(f"pd up: error: ports already in use on {host}: {busy}; choose another --port / --bootstrap-port "
              "(pd up uses --port, the ports right after it, and --bootstrap-port on)", file=sys.stderr)  # fmt: skip
        return 2
    auth_header = sample_auth_header(serve_argv, args)
    serve_argv = _without_flags(serve_argv, API_KEY_FLAGS)
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if args.api_key is not None:
        env[API_KEY_ENV] = args.api_key
    if args.model_path is None:
        from pd.default_model import build_default_model

        try:
            serve_argv += ["--model-path", build_default_model()]  # once here, not raced by every instance
        except KeyboardInterrupt:
            print("pd up: interrupted while building the default model", file=sys.stderr)
            return 128 + signal.SIGINT

    children: list[Child] = []
    stopping = threading.Event()
    received: list[int] = []
    # Every rank process of every instance shares this machine's cores.
    threads = max(1, usable_cores() // ((ns.num_prefill + ns.num_decode) * args.tp_size))

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    grace = STARTUP_STOP_GRACE_S
    try:
        for i, (port, bport) in enumerate(zip(prefill_ports, bootstrap_ports, strict=True)):
            argv = ["serve", *serve_argv, "--disaggregation-mode", "prefill", "--host", host, "--port", str(port),
                    "--disaggregation-bootstrap-port", str(bport)]  # fmt: skip
            children.append(_spawn(f"prefill-{i}", argv, f"http://{host}:{port}", env, threads))
        for j, port in enumerate(decode_ports):
            argv = ["serve", *serve_argv, "--disaggregation-mode", "decode", "--host", host, "--port", str(port)]
            children.append(_spawn(f"decode-{j}", argv, f"http://{host}:{port}", env, threads))
        lb_args = ["lb", "--host", host, "--port", str(ns.port), "--policy", ns.policy]
        for flag, value in (("--prefill-policy", ns.prefill_policy), ("--decode-policy", ns.decode_policy)):
            if value is not None:
                lb_args += [flag, value]
        for port, bport in zip(prefill_ports, bootstrap_ports, strict=True):
            lb_args += ["--prefill", f"http://{host}:{port}", str(bport)]
        for port in decode_ports:
            lb_args += ["--decode", f"http://{host}:{port}"]
        error = _wait_healthy(children, ns.start_timeout, stopping)
        if error is None:
            children.append(_spawn("lb", lb_args, f"http://{host}:{ns.port}", env))
            error = _wait_healthy(children[-1:], 60, stopping)
        if error == "stopping":
            name = signal.Signals(received[0]).name
            print(f"pd up: interrupted by {name} during start-up; stopping {len(children)} processes",
                  file=sys.stderr, flush=True)  # fmt: skip
            return 128 + received[0]
        if error is not None:
            print(f"pd up: {error}", file=sys.stderr)
            return 1
        grace = STOP_GRACE_S
        url = f"http://{host}:{ns.port}"
        print(
            f"\nPD cluster ready: {ns.num_prefill} prefill + {ns.num_decode} decode behind {url}\n"
            f"Try:\n  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth_header} -d "
            '\'{"messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 32, "temperature": 0}\'\n'
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stopping.wait(1.0):
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                dead[0].output.join(2)
                print(
                    f"pd up: {dead[0].name} exited with code {dead[0].proc.returncode}; stopping the rest",
                    file=sys.stderr,
                )
                return 1
        print("pd up: stopping", flush=True)
        return 0
    finally:
        _stop(children, grace)
