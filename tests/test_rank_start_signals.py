"""A front stopped while it starts a rank (SIGTERM from `pd up` stopping an instance still starting up, Ctrl-C) stops
cleanly: the signal takes effect once the rank's start is over (pd.dist.launch.signals_held).

The oracle for the real case is the fork server itself: a front that died between connecting to it and sending the
rank's file descriptors left it to die on the half-sent message, printing an EOFError traceback into the instance's
output (seen in `pd up`'s Ctrl-C test). Here the signal is raised at exactly that point of the handshake.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pd.dist.launch import signals_held

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A front that gets SIGTERM in the middle of its handshake with the fork server, as it starts its one rank.
FRONT = textwrap.dedent("""
    import signal, time
    from multiprocessing import reduction
    from pd.dist import launch
    from pd.dist.topology import InstanceLayout

    launch.RANK_PRELOAD = []  # the fork server without the engine's imports: only the handshake matters here
    launch.start_rank_launcher()
    send = reduction.sendfds

    def send_after_a_stop(sock, fds):
        reduction.sendfds = send  # once
        print("connected to the fork server", flush=True)
        time.sleep(0.5)  # the server, woken by the connection, now waits for the descriptors
        signal.raise_signal(signal.SIGTERM)  # the stop arrives here, before the descriptors are sent
        return send(sock, fds)

    reduction.sendfds = send_after_a_stop
    launch.RankProcesses.spawn(InstanceLayout(), print, None)
    print("went on after the stop", flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ranks fork from the fork server on Linux only")
def test_sigterm_during_a_ranks_start_stops_the_front_after_it_and_leaves_the_fork_server_quiet() -> None:
    done = subprocess.run([sys.executable, "-c", FRONT], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    assert "connected to the fork server" in done.stdout, done.stdout + done.stderr
    # SIGTERM's default action, taken once the start was over: the front ends there, killed by the signal
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr
    assert "went on after the stop" not in done.stdout
    assert "Traceback" not in done.stderr, done.stderr


def test_signals_inside_the_block_reach_their_handlers_after_it_once_each_in_order() -> None:
    seen: list[tuple[int, bool]] = []
    inside = False

    def record(signum: int, frame: object) -> None:
        seen.append((signum, inside))

    previous = {sig: signal.signal(sig, record) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_held():
            inside = True
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
            assert seen == []
            inside = False
        assert seen == [(signal.SIGTERM, False), (signal.SIGINT, False)]
        assert signal.getsignal(signal.SIGINT) is record and signal.getsignal(signal.SIGTERM) is record
        signal.raise_signal(signal.SIGINT)  # after the block, at once again
        assert seen[-1] == (signal.SIGINT, False) and len(seen) == 3
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
