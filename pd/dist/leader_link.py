"""The link between the HTTP front (node 0) and DP-attention leaders on other nodes.

Leaders on node 0 talk to the front over pipes. Under DP attention across nodes, a group whose ranks live on
another node has its leader there; that leader connects to the front over TCP instead, at --dist-init-addr's
host and port + 1, and the connection then carries the same messages as a pipe (msgpack through send_bytes /
recv_bytes, both directions on one socket). Handshake: multiprocessing's HMAC challenge both ways with a key
derived from the instance's address, then the leader's global rank (8 bytes). The key keeps stray connections
out; like torch.distributed's TCPStore on --dist-init-addr, it is no authentication between untrusted hosts.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge

from pd.dist.topology import InstanceLayout

logger = logging.getLogger(__name__)

LINK_PORT_OFFSET = 1  # the front listens on --dist-init-addr's port + 1
HANDSHAKE_TIMEOUT_S = 10.0


def node0_host(init_addr: str) -> str:
    """Node 0's address (--dist-init-addr's host): the HTTP front and the PD bootstrap server run there."""
    return init_addr.rsplit(":", 1)[0].strip("[]")


def link_address(layout: InstanceLayout) -> tuple[str, int]:
    return node0_host(layout.init_addr), int(layout.init_addr.rsplit(":", 1)[1]) + LINK_PORT_OFFSET


def _authkey(layout: InstanceLayout) -> bytes:
    return hashlib.sha256(f"pd-leader-link {layout.init_addr} {layout.tp} {layout.dp}".encode()).digest()


class RemoteLeaderListener:
    """Front side: listens (before the local ranks start, so a busy port fails at once) for the leaders of the
    DP groups on other nodes, given by global rank."""

    def __init__(self, layout: InstanceLayout, ranks: list[int]) -> None:
        self.expected, self.address, self.authkey = sorted(ranks), link_address(layout), _authkey(layout)
        try:
            self.sock = socket.create_server(self.address)
        except OSError as e:
            raise OSError(f"cannot listen for the other nodes' DP leaders on {self.address[0]}:{self.address[1]} "
                          f"(--dist-init-addr's port + {LINK_PORT_OFFSET}): {e}") from e  # fmt: skip
        self.sock.settimeout(0.5)

    def accept_all(self, timeout_s: float, local_ranks_alive: Callable[[], bool]) -> dict[int, Connection]:
        """rank -> connection, once every expected leader connected. Raises TimeoutError (naming the missing
        ranks) after timeout_s, RuntimeError when a local rank exits meanwhile (the instance cannot start)."""
        deadline, conns = time.monotonic() + timeout_s, {}
        try:
            while missing := [r for r in self.expected if r not in conns]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the leaders of ranks {missing} (DP attention, other nodes) did not connect to "
                                       f"{self.address[0]}:{self.address[1]} within {timeout_s:.0f}s")  # fmt: skip
                if not local_ranks_alive():
                    raise RuntimeError("a rank on this node exited while waiting for the other nodes' DP leaders")
                try:
                    sock, peer = self.sock.accept()
                except TimeoutError:
                    continue
                joined = self._handshake(sock, peer)
                if joined is None:
                    continue
                rank, conn = joined
                if rank in missing:
                    conns[rank] = conn
                    logger.info("DP leader rank %d connected from %s", rank, peer[0])
                else:
                    logger.warning("refused a connection from %s claiming rank %d (expected %s)", peer[0], rank,
                                   missing)  # fmt: skip
                    conn.close()
        except BaseException:
            for conn in conns.values():
                conn.close()
            raise
        finally:
            self.close()
        return conns

    def close(self) -> None:
        self.sock.close()

    def _handshake(self, sock: socket.socket, peer: tuple) -> tuple[int, Connection] | None:
        """(rank, connection) of a leader that passed the challenge, or None (the connection is closed)."""
        sock.setblocking(True)  # Connection needs a blocking descriptor
        fd = sock.detach()
        _recv_timeout(fd, HANDSHAKE_TIMEOUT_S)  # a peer that connects and says nothing must not stall the front
        conn = Connection(fd)
        try:
            deliver_challenge(conn, self.authkey)
            answer_challenge(conn, self.authkey)
            rank = int.from_bytes(conn.recv_bytes(8), "little")
        except Exception as e:  # noqa: BLE001 - a stray or broken connection must not stop the front
            logger.warning("refused a connection from %s: %s", peer[0], e)
            conn.close()
            return None
        _recv_timeout(fd, 0)  # from now on the front's reader waits as long as the leader is quiet
        return rank, conn


def _recv_timeout(fd: int, seconds: float) -> None:
    """SO_RCVTIMEO on a descriptor (0: none)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", int(seconds), 0))
    finally:
        sock.detach()  # the descriptor stays open, owned by the Connection


def connect_to_front(layout: InstanceLayout, rank: int, timeout_s: float = 120.0) -> Connection:
    """Leader side: the connection to the front (retried while it is not listening yet)."""
    address, deadline = link_address(layout), time.monotonic() + timeout_s
    while True:
        try:
            conn = Client(address, authkey=_authkey(layout))
            conn.send_bytes(rank.to_bytes(8, "little"))
            return conn
        except OSError as e:
            if time.monotonic() > deadline:
                raise OSError(f"rank {rank}: cannot reach the HTTP front on node 0 at {address[0]}:{address[1]}: "
                              f"{e}") from e  # fmt: skip
            time.sleep(0.5)
