"""The test helper that starts servers (tests/server_process.py): a server it started dies with the process that
started it, however that process dies, so that a test run killed by a timeout leaves no server on a GPU under
whatever runs there next."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.server_process import free_port, process_alive

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")

# A parent that starts a plain HTTP server through healthy_process, says the server's pid, then waits to be killed.
PARENT = """
import sys, time
from tests.server_process import healthy_process
port = int(sys.argv[1])
with healthy_process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], port,
                     health_path="/") as (url, proc):
    print(proc.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_server_dies_with_the_process_that_started_it(sig: signal.Signals) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(free_port())], stdout=subprocess.PIPE, cwd=root,
                              env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    try:
        line = parent.stdout.readline() if parent.stdout else b""
        assert line.strip().isdigit(), f"the parent did not start its server: {line!r}"
        server = int(line)
        assert process_alive(server)
        parent.send_signal(sig)  # SIGTERM ends Python at once, with no finally blocks run: as SIGKILL does
        parent.wait(30)
        deadline = time.monotonic() + 10
        while process_alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(server), "the server outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()
