"""The processes `pd serve` starts die with it, however it dies.

SIGKILLed, the front gets no chance to stop its ranks, and a rank busy in a long step or waiting in a collective
would not notice its pipe closing. Here every rank is frozen (SIGSTOP) before the front is killed, so only the
kernel's parent-death signal can end it; multiprocessing's resource tracker, the front's other child, must follow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.server_process import HTTP, free_port, process_alive
from tests.tiny_checkpoints import make_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")


def _descendants(pid: int) -> list[int]:
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            for child in map(int, f.read().split()):
                found += [child, *_descendants(child)]
    return found


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _comm(pid: int) -> str:
    """The process's name: pd-rankN for a rank (pd.dist.launch names them)."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def test_ranks_frozen_by_sigstop_die_within_seconds_of_a_sigkilled_front(tmp_path: Path) -> None:
    path = make_checkpoint("qwen3_moe", str(tmp_path / "m"), seed=int(torch.randint(0, 2**31, ()).item()))
    port, log = free_port(), tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pd", "serve", "--model-path", path, "--device", "cpu", "--dtype", "float32",
           "--port", str(port), "--tp", "2", "--skip-tokenizer-init"]  # fmt: skip
    with open(log, "w") as out:
        front = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if HTTP.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert front.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        children = _descendants(front.pid)
        ranks = [pid for pid in children if _comm(pid).startswith("pd-rank")]
        assert len(ranks) == 2, [_cmdline(pid) for pid in children]
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        os.kill(front.pid, signal.SIGKILL)
        front.wait(10)
        deadline = time.monotonic() + 5
        while any(map(process_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: _cmdline(pid)[:80] for pid in children if process_alive(pid)}
        assert not left, f"still running 5 s after the front was killed: {left}"
    finally:
        if front.poll() is None:
            front.kill()
            front.wait(10)
        for pid in children:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
