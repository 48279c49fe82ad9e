"""The Mooncake transfer engine behind calls that cannot hang.

Mooncake's Python calls block and report errors as return codes. Each call here runs on a worker thread and is
waited for with a deadline; a non-zero code or a missed deadline is a KVTransferError with what was called.
Calls are serialised on one worker: Mooncake's TCP transport rejects a batch once about 2048 regions are
queued (and then fails later batches for a while), so concurrent batches from several threads are unsafe.

Exposure: Mooncake binds its P2P handshake listener and its TCP data listener to the wildcard address, whatever
host it is given (its source hard-codes INADDR_ANY / in6addr_any, and no option changes that), and the data
listener lets anyone who connects read and write the registered KV memory. So when the instance was asked for
one address, the engine logs a warning naming the ports that listen wider; README "Security" says how to fence
them (a firewall; MC_MIN_RPC_PORT / MC_MAX_RPC_PORT, read by Mooncake, keep them in a known range).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from kvtransfer.base import KVArgs, KVTransferError
from kvtransfer.messages import KVTarget

logger = logging.getLogger(__name__)

# Regions per batch call. Mooncake's TCP lanes queue ~2048 entries; staying at half leaves room for a call
# abandoned after a timeout that may still be draining.
MAX_REGIONS_PER_BATCH = 1024
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def wildcard_listen_ports() -> set[int]:
    """TCP ports this process listens on at every address (0.0.0.0 or ::). Read from Linux's /proc: the
    sockets of this network namespace, kept if one of our file descriptors holds them; empty elsewhere."""
    inodes = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            address, port = fields[1].rsplit(":", 1)
            listening = fields[3] == "0A"
            if listening and fields[9] in inodes and int(address, 16) == 0:
                ports.add(int(port, 16))
    return ports


class MooncakeEngine:
    """One Mooncake TransferEngine (P2P handshake, no metadata server) on `host`.

    session_id ("host:rpc_port") is what peers pass to write into this engine's registered memory.
    wide_ports: the engine's ports that listen on every address although `host` is one address (see the module
    docstring); empty when `host` is itself a wildcard.
    """

    def __init__(self, host: str, protocol: str = "tcp", device_name: str = "", call_timeout_s: float = 10.0) -> None:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as e:
            raise KVTransferError(
                "the mooncake KV transfer backend needs the Mooncake transfer engine: "
                "pip install mooncake-transfer-engine (or mooncake-transfer-engine-non-cuda on CPU)"
            ) from e
        self._call_timeout_s = call_timeout_s
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mooncake")
        self._te = TransferEngine()
        self._registered: list[tuple[int, int]] = []
        listening_before = wildcard_listen_ports()
        self._call("initialize", self._te.initialize, host, "P2PHANDSHAKE", protocol, device_name)
        self.session_id = f"{host}:{self._te.get_rpc_port()}"
        self.wide_ports: list[int] = []
        if host not in _WILDCARD_HOSTS:
            self.wide_ports = sorted(wildcard_listen_ports() - listening_before)
        if self.wide_ports:
            logger.warning(
                "the Mooncake transfer engine listens on every address, not only %s: ports %s (Mooncake cannot bind "
                "one address). Anyone who reaches them can read and write this instance's KV cache; firewall them "
                "(MC_MIN_RPC_PORT / MC_MAX_RPC_PORT keep them in a range). See README, Security.",
                host, ", ".join(map(str, self.wide_ports)))  # fmt: skip

    def register(self, ptrs: Sequence[int], lengths: Sequence[int]) -> None:
        """Registers [ptr, ptr + length) regions so peers may write into them (and we may read from them)."""
        self._call("batch_register_memory", self._open().batch_register_memory, list(ptrs), list(lengths))
        self._registered.extend(zip(ptrs, lengths, strict=True))

    def write(self, session_id: str, src: Sequence[int], dst: Sequence[int], lengths: Sequence[int],
              timeout_s: float) -> None:
        """Copies local src[i] .. +lengths[i] to dst[i] in the peer engine `session_id`; returns once landed.

        At most MAX_REGIONS_PER_BATCH regions. Raises KVTransferError on failure or after timeout_s.
        """
        assert len(src) <= MAX_REGIONS_PER_BATCH, "split batches with pages.chunk_bounds"
        self._call(f"write of {len(src)} regions to {session_id}", self._open().batch_transfer_sync_write,
                   session_id, list(src), list(dst), list(lengths), timeout_s=timeout_s)

    def _open(self) -> Any:
        if self._te is None:
            raise KVTransferError("the Mooncake transfer engine is closed")
        return self._te

    def close(self) -> None:
        if self._te is None:
            return
        if self._registered:
            ptrs = [p for p, _ in self._registered]
            self._registered = []
            try:
                self._call("batch_unregister_memory", self._te.batch_unregister_memory, ptrs)
            except KVTransferError as e:
                logger.warning("%s", e)
        self._executor.shutdown(wait=False, cancel_futures=True)
        # Mooncake's destructor closes its sockets holding the GIL (up to ~1 s): run it here, at close, rather
        # than whenever the garbage collector reaches the engine, which stalls every thread of a live process.
        # A worker still inside a wedged call keeps its own reference, so this never frees an engine in use.
        self._te = None

    def _call(self, what: str, fn: Callable[..., int], *args: object, timeout_s: float | None = None) -> None:
        timeout_s = self._call_timeout_s if timeout_s is None else timeout_s
        with self._lock:
            executor = self._executor
        future = executor.submit(fn, *args)
        try:
            rc = future.result(timeout=max(timeout_s, 0.0))
        except FutureTimeout:
            future.cancel()
            # The worker may be stuck inside Mooncake for good; later calls get a fresh one so that one wedged
            # peer does not fail every other transfer.
            with self._lock:
                if self._executor is executor:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="mooncake")
            executor.shutdown(wait=False, cancel_futures=True)
            raise KVTransferError(f"mooncake {what} did not finish within {timeout_s:.1f}s") from None
        if rc != 0:
            raise KVTransferError(f"mooncake {what} failed (return code {rc})")


def registered_engine(args: KVArgs, host: str, protocol: str = "tcp", device_name: str = "",
                      io_timeout_s: float = 5.0) -> tuple[MooncakeEngine, KVTarget]:  # fmt: skip
    """A transfer engine with this rank's KV buffers registered, and the KVTarget its leader knows the rank by (a
    follower of either role). Raises KVTransferError (the engine closed) when the engine cannot start or register
    the memory."""
    engine = MooncakeEngine(host, protocol, device_name, io_timeout_s)
    try:
        engine.register(args.kv_data_ptrs, args.kv_data_lens)
    except BaseException:
        engine.close()
        raise
    return engine, KVTarget(args.engine_rank, engine.session_id, list(args.kv_data_ptrs), list(args.kv_item_lens),
                            list(args.kv_heads))  # fmt: skip
