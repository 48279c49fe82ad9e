"""pd.dist.leader_link: DP leaders on other nodes reach the HTTP front over TCP (handshake, refusals, deadlines)."""

from __future__ import annotations

import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from pd.dist.leader_link import RemoteLeaderListener, connect_to_front, link_address
from pd.dist.topology import InstanceLayout
from pd.engine.spec import instance_layout
from tests.server_process import free_dist_init_addr
from tests.test_server_args import parse


def _layout(tp: int = 4, dp: int = 4) -> InstanceLayout:
    return instance_layout(parse(f"--tp {tp} --dp-size {dp} --enable-dp-attention --nnodes 2 "
                                 f"--dist-init-addr {free_dist_init_addr()}"))  # fmt: skip


def test_expected_leaders_connect_and_messages_flow_both_ways() -> None:
    layout = _layout()
    listener = RemoteLeaderListener(layout, [2, 3])
    leaders: dict[int, object] = {}

    def leader(rank: int) -> None:
        conn = connect_to_front(layout, rank, timeout_s=10)
        leaders[rank] = conn
        conn.send_bytes(conn.recv_bytes() + b" back from %d" % rank)

    threads = [threading.Thread(target=leader, args=(r,)) for r in (3, 2)]
    for t in threads:
        t.start()
    conns = listener.accept_all(10, lambda: True)
    assert sorted(conns) == [2, 3]
    for rank, conn in conns.items():
        conn.send_bytes(b"hello")
        assert conn.recv_bytes() == b"hello back from %d" % rank
    for t in threads:
        t.join(10)
    for conn in [*conns.values(), *leaders.values()]:
        conn.close()  # type: ignore[attr-defined]


def test_strangers_and_unexpected_ranks_are_refused_and_the_wait_goes_on() -> None:
    layout = _layout()
    listener = RemoteLeaderListener(layout, [3])
    outcome: dict[str, object] = {}

    def strangers() -> None:
        try:
            Client(link_address(layout), authkey=b"not the instance's key")
        except (AuthenticationError, EOFError, OSError) as e:
            outcome["stranger"] = e
        intruder = connect_to_front(layout, 1, timeout_s=10)  # right key, a rank that is not a remote leader
        try:
            intruder.recv_bytes()  # the front closes it
        except (EOFError, OSError) as e:
            outcome["intruder"] = e
        outcome["leader"] = connect_to_front(layout, 3, timeout_s=10)

    thread = threading.Thread(target=strangers)
    thread.start()
    conns = listener.accept_all(20, lambda: True)
    thread.join(10)
    assert list(conns) == [3] and "stranger" in outcome and "intruder" in outcome
    conns[3].close()
    outcome["leader"].close()  # type: ignore[attr-defined]


def test_missing_leaders_time_out_by_name_and_a_dead_local_rank_ends_the_wait() -> None:
    layout = _layout()
    with pytest.raises(TimeoutError, match=r"leaders of ranks \[2, 3\]"):
        RemoteLeaderListener(layout, [2, 3]).accept_all(0.5, lambda: True)
    with pytest.raises(RuntimeError, match="a rank on this node exited"):
        RemoteLeaderListener(layout, [2, 3]).accept_all(30, lambda: False)


def test_a_busy_link_port_is_a_clear_error() -> None:
    layout = _layout()
    first = RemoteLeaderListener(layout, [2])
    try:
        with pytest.raises(OSError, match=r"--dist-init-addr's port \+ 1"):
            RemoteLeaderListener(layout, [2])
    finally:
        first.close()
