"""A small control channel: msgpack messages in length-prefixed frames over TCP.

Frame: 4-byte big-endian length, then that many bytes of one encoded kvtransfer.messages message.
ControlServer accepts connections and hands every decoded message to a callback (on its connection's reader
thread, so the callback must be quick). ControlPool keeps one outbound connection per peer address, connects
and sends with deadlines, and reports a peer whose connection drops (the cheap way to notice a dead process).

With a secret (the instances' --api-key) every frame starts with HMAC-SHA256(secret, message): a listener
drops the connection of a peer whose frame does not carry it, so a process without the key can neither claim a
room (and have KV written where it says) nor fail or abort another's. The key itself never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import struct
import threading
from collections.abc import Callable

from kvtransfer.base import KVTransferError
from kvtransfer.messages import ControlMessage, decode_message, encode_message

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 64 << 20  # a registration of a 1M-token prompt at page size 1 is ~10 MB
_TAG_BYTES = hashlib.sha256().digest_size


def _key(secret: str | None) -> bytes | None:
    return None if secret is None else secret.encode()


def _signed(key: bytes | None, body: bytes) -> bytes:
    """A frame's payload: the message, after its HMAC when there is a key."""
    return body if key is None else hmac.digest(key, body, "sha256") + body


def _verified(key: bytes | None, payload: bytes) -> bytes | None:
    """The message of a payload, or None when a key is set and the payload is not signed with it."""
    if key is None:
        return payload
    tag, body = payload[:_TAG_BYTES], payload[_TAG_BYTES:]
    return body if hmac.compare_digest(tag, hmac.digest(key, body, "sha256")) else None


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KVTransferError(f"bad address {addr!r}: expected host:port with a port in 1..65535")
    return host, int(port)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None when the peer closed the connection first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class ControlServer:
    """Listens on host:port (0 = any free port); calls on_message(msg) for every valid message received. With a
    secret, only messages signed with it (ControlPool with the same secret) are; a peer that sends anything
    else is disconnected."""

    def __init__(self, host: str, port: int, on_message: Callable[[ControlMessage], None],
                 secret: str | None = None) -> None:
        self._on_message = on_message
        self._key = _key(secret)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._closed = False
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name=f"kv-control-accept-{self.address}", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(target=self._read_loop, args=(conn, peer), name="kv-control-read", daemon=True).start()

    def _read_loop(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            while True:
                header = _recv_exact(conn, _HEADER.size)
                if header is None:
                    return
                (size,) = _HEADER.unpack(header)
                if size > MAX_FRAME_BYTES:
                    logger.warning("control frame of %d bytes from %s exceeds the limit; dropping the connection",
                                   size, peer)
                    return
                payload = _recv_exact(conn, size)
                if payload is None:
                    return
                body = _verified(self._key, payload)
                if body is None:
                    logger.warning("control message from %s is not signed with this instance's key; dropping the "
                                   "connection (start every prefill and decode instance with the same --api-key)",
                                   peer)
                    return
                try:
                    msg = decode_message(body)
                except KVTransferError as e:
                    # The stream is still framed correctly, so one bad message need not cost the connection.
                    logger.warning("invalid control message from %s: %s", peer, e)
                    continue
                try:
                    self._on_message(msg)
                except Exception:
                    logger.exception("control message handler failed on %s", type(msg).__name__)
        except OSError:
            pass  # reset by peer or closed by us
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the accept thread
        except OSError:
            pass
        self._sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class _Connection:
    """One outbound connection. send() is serialised; a reader thread notices the peer closing it."""

    def __init__(self, addr: str, timeout_s: float, on_lost: Callable[[_Connection], None]) -> None:
        self.addr = addr
        try:
            self._sock = socket.create_connection(split_addr(addr), timeout=timeout_s)
        except OSError as e:  # refused, unreachable, timed out
            raise KVTransferError(f"cannot connect to {addr}: {e}") from e
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._on_lost = on_lost
        self.alive = True
        threading.Thread(target=self._watch, name=f"kv-control-watch-{addr}", daemon=True).start()

    def _watch(self) -> None:
        # Peers never send on this connection, so any return from recv() (EOF or error) means it is gone.
        while self.alive:
            try:
                if not self._sock.recv(1):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        if self.alive:
            self.alive = False
            self._on_lost(self)

    def send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(_HEADER.pack(len(data)) + data)
            except OSError as e:
                # A partial frame would corrupt the stream: the connection is unusable from here on.
                self.close()
                raise KVTransferError(f"sending to {self.addr} failed: {e}") from e

    def close(self) -> None:
        self.alive = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class ControlPool:
    """Outbound connections by peer address, made on first use.

    timeout_s bounds each connect and each send. on_peer_lost(addr) runs (on a watcher thread) when an open
    connection drops without us closing it. secret: every message is signed with it (see ControlServer).
    """

    def __init__(self, timeout_s: float, on_peer_lost: Callable[[str], None] | None = None,
                 secret: str | None = None) -> None:
        self._key = _key(secret)
        self._timeout_s = timeout_s
        self._on_peer_lost = on_peer_lost
        self._conns: dict[str, _Connection] = {}
        self._lock = threading.Lock()
        self._connect_locks: dict[str, threading.Lock] = {}

    def send(self, addr: str, msg: ControlMessage) -> None:
        """Sends msg to the ControlServer at addr. Raises KVTransferError (peer down, refused, timed out)."""
        data = _signed(self._key, encode_message(msg))
        conn = self._get(addr)
        try:
            conn.send(data)
        except KVTransferError:
            # The cached connection may predate a peer restart: one fresh attempt, then give up.
            self._drop(conn)
            self._get(addr).send(data)

    def _get(self, addr: str) -> _Connection:
        with self._lock:
            conn = self._conns.get(addr)
            if conn is not None and conn.alive:
                return conn
            connect_lock = self._connect_locks.setdefault(addr, threading.Lock())
        with connect_lock:  # one connect per peer even when many rooms register at once
            with self._lock:
                conn = self._conns.get(addr)
                if conn is not None and conn.alive:
                    return conn
            conn = _Connection(addr, self._timeout_s, self._lost)
            with self._lock:
                self._conns[addr] = conn
            return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            if self._conns.get(conn.addr) is conn:
                del self._conns[conn.addr]

    def _lost(self, conn: _Connection) -> None:
        self._drop(conn)
        logger.debug("control connection to %s lost", conn.addr)
        if self._on_peer_lost is not None:
            self._on_peer_lost(conn.addr)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
