"""The prefill instance's bootstrap server: where decode ranks find the prefill ranks' transfer endpoints.

  PUT /route    body: a RankInfo (JSON)         a prefill rank announces itself (again after a restart)
  GET /route    -> {"tp_size": n, "dp_size": d, "ranks": [RankInfo, ...]}   once all d x n ranks are in
                   (n ranks per DP-attention group, d groups; d = 1 without DP attention);
                   503 {"error": ...} before that (says which are missing)
  GET /health   -> 200

Rank 0 of a prefill instance serves it on --disaggregation-bootstrap-port; decode ranks read it through
BootstrapClient, once per prefill instance (cached until a failure invalidates it).

With a secret (the instances' --api-key) both /route methods need `Authorization: Bearer <secret>`, and answer
401 without it: the route holds the address of every KV buffer, and a registration redirects decode's
transfers. /health stays open, like the HTTP front's.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kvtransfer.base import KVTransferError
from kvtransfer.messages import RankInfo, rank_info_from_json, rank_info_to_json

logger = logging.getLogger(__name__)

# A rank's info is a few KB even with hundreds of KV buffers; a bigger PUT body is refused unread.
MAX_BODY_BYTES = 1 << 20
# Ranks of one prefill instance (tp_size x dp_size); a registration claiming more is refused, so GET /route never
# has to list an unbounded number of missing ranks.
MAX_RANKS = 4096
# How long a handler thread waits for a client's next bytes (a request line, headers, the body) before giving up.
CLIENT_TIMEOUT_S = 30.0


class _RouteTable:
    def __init__(self) -> None:
        self._ranks: dict[tuple[int, int], RankInfo] = {}  # (dp_rank, engine_rank) -> info
        self._lock = threading.Lock()

    def put(self, info: RankInfo) -> str | None:
        """Stores info; returns why it was refused, or None."""
        if not 0 <= info.engine_rank < info.tp_size:
            return f"engine_rank {info.engine_rank} is outside tp_size {info.tp_size}"
        if not 0 <= info.dp_rank < info.dp_size:
            return f"dp_rank {info.dp_rank} is outside dp_size {info.dp_size}"
        if info.tp_size * info.dp_size > MAX_RANKS:
            return f"tp_size {info.tp_size} x dp_size {info.dp_size} is more than the {MAX_RANKS} ranks allowed"
        key = (info.dp_rank, info.engine_rank)
        with self._lock:
            other = next((r for k, r in self._ranks.items() if k != key), None)
            if other is not None and (other.tp_size, other.dp_size) != (info.tp_size, info.dp_size):
                return (f"tp_size {info.tp_size}, dp_size {info.dp_size} disagree with DP group {other.dp_rank} rank "
                        f"{other.engine_rank}'s {other.tp_size}, {other.dp_size}")  # fmt: skip
            self._ranks[key] = info
        return None

    def get(self) -> tuple[int, dict[str, object]]:
        """(HTTP status, JSON body) of GET /route."""
        with self._lock:
            ranks = dict(self._ranks)
        if not ranks:
            return 503, {"error": "no prefill rank has registered with this bootstrap server yet"}
        first = next(iter(ranks.values()))
        tp_size, dp_size = first.tp_size, first.dp_size
        if len(ranks) < tp_size * dp_size:
            missing = sorted(set(itertools.product(range(dp_size), range(tp_size))) - set(ranks))
            return 503, {"error": f"prefill ranks {missing} (DP group, rank) of dp_size {dp_size} x tp_size "
                                  f"{tp_size} have not registered yet"}  # fmt: skip
        return 200, {"tp_size": tp_size, "dp_size": dp_size,
                     "ranks": [rank_info_to_json(ranks[k]) for k in sorted(ranks)]}  # fmt: skip


class BootstrapServer:
    """Threaded HTTP server holding the route table. port=0 picks a free port (see .port). With a secret,
    /route answers 401 to a request without `Authorization: Bearer <secret>`."""

    def __init__(self, host: str, port: int, secret: str | None = None) -> None:
        table = _RouteTable()
        expected = f"Bearer {secret}".encode() if secret is not None else None

        class Handler(BaseHTTPRequestHandler):
            timeout = CLIENT_TIMEOUT_S  # a client that stalls mid-request costs its thread this long, not forever

            def _reply(self, status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                """http.server's own refusals (a bad request line, headers too long) in this server's JSON shape."""
                self.close_connection = True
                self._reply(code, {"error": message or self.responses.get(code, ("error",))[0]})

            def _not_allowed(self) -> None:
                self._reply(405, {"error": f"{self.command} is not supported: GET /route, PUT /route, GET /health"},
                            {"Allow": "GET, PUT"})

            do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _not_allowed  # noqa: N815

            def _authorized(self) -> bool:
                """Whether the request carries the secret; answers 401 when it does not."""
                given = (self.headers.get("Authorization") or "").encode()
                if expected is None or hmac.compare_digest(given, expected):
                    return True
                self._reply(401, {"error": "missing or invalid key: this prefill instance's bootstrap server needs "
                                           "'Authorization: Bearer <key>' with its --api-key"})  # fmt: skip
                return False

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                if path == "/route":
                    if self._authorized():
                        self._reply(*table.get())
                elif path == "/health":
                    self._reply(200, {"status": "ok"})
                else:
                    self._reply(404, {"error": f"no such path {path}"})

            def do_PUT(self) -> None:  # noqa: N802
                if self.path.split("?", 1)[0] != "/route":
                    self._reply(404, {"error": f"no such path {self.path}"})
                    return
                if not self._authorized():  # before the body is read: a stranger's bytes are not parsed
                    return
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    self.close_connection = True  # the body, if any, is not read
                    status = 413 if length > MAX_BODY_BYTES else 400
                    self._reply(status, {"error": f"Content-Length must be 0..{MAX_BODY_BYTES}, got "
                                                  f"{self.headers.get('Content-Length')!r}"})
                    return
                try:
                    info = rank_info_from_json(json.loads(self.rfile.read(length)))
                except RecursionError:
                    self._reply(400, {"error": "bad rank info: nested too deeply"})
                    return
                except (ValueError, KVTransferError) as e:
                    self._reply(400, {"error": f"bad rank info: {e}"})
                    return
                problem = table.put(info)
                self._reply(409 if problem else 200, {"error": problem} if problem else {"status": "ok"})

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base class signature)
                logger.debug("bootstrap %s: " + format, self.address_string(), *args)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.host = host
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="kv-bootstrap", daemon=True)

    def start(self) -> BootstrapServer:
        self._thread.start()
        logger.info("KV bootstrap server listening on %s:%d", self.host, self.port)
        return self

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _auth_headers(secret: str | None) -> dict[str, str]:
    return {} if secret is None else {"Authorization": f"Bearer {secret}"}


def _request(method: str, url: str, body: dict[str, object] | None, timeout_s: float,
             secret: str | None = None) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP call; raises OSError when the server cannot be reached."""
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json", **_auth_headers(secret)}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": e.reason}
    except urllib.error.URLError as e:
        raise OSError(str(e.reason)) from e


@dataclass(frozen=True)
class PrefillRoute:
    """What GET /route returned: the prefill instance's TP size (per DP-attention group), its number of DP groups,
    and its ranks by (DP group, engine rank)."""

    tp_size: int
    dp_size: int
    ranks: dict[tuple[int, int], RankInfo]

    def rank_for(self, room: int, engine_rank: int) -> RankInfo:
        """The rank holding ``room``'s KV: room r is prefilled by DP group r % dp_size (the prefill front's rule)."""
        return self.ranks[(room % self.dp_size, engine_rank)]


def _refused_key(host: str, port: int, secret: str | None) -> KVTransferError:
    given = "no key" if secret is None else "a key it does not accept"
    return KVTransferError(f"bootstrap server {host}:{port} refused {given} (401): start every prefill and decode "
                           "instance with the same --api-key (or --api-key-file / PD_API_KEY)")


class BootstrapClient:
    """Talks to prefill bootstrap servers; remembers each instance's route until invalidate(). secret: the key
    sent as a bearer token (the instances' --api-key), or None."""

    def __init__(self, timeout_s: float = 5.0, secret: str | None = None) -> None:
        self.timeout_s = timeout_s
        self._secret = secret
        self._cache: dict[tuple[str, int], PrefillRoute] = {}
        self._fetch_locks: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def put_route(self, host: str, port: int, info: RankInfo, timeout_s: float | None = None) -> None:
        """Announces a prefill rank. Retries while the server is not up yet (rank 0 may start it a moment
        later than this rank gets here); raises KVTransferError after timeout_s (default: the client's) or on
        a refusal."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                status, body = _request("PUT", f"http://{host}:{port}/route", rank_info_to_json(info), self.timeout_s,
                                        self._secret)
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise KVTransferError(f"bootstrap server {host}:{port} unreachable: {e}") from e
                time.sleep(0.05)
                continue
            if status == 401:
                raise _refused_key(host, port, self._secret)
            if status != 200:
                raise KVTransferError(f"bootstrap server {host}:{port} refused rank info: {body.get('error')}")
            return

    def get_route(self, host: str, port: int, timeout_s: float | None = None) -> PrefillRoute:
        """The prefill instance's route, from the cache or the server.

        Waits (polling) while the server says ranks are still registering; raises KVTransferError at once when
        the server cannot be reached (the prefill instance is down), or after the timeout.
        """
        key = (host, port)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            fetch_lock = self._fetch_locks.setdefault(key, threading.Lock())
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with fetch_lock:  # one fetch per instance, however many rooms ask at once
            with self._lock:
                if key in self._cache:
                    return self._cache[key]
            while True:
                remaining = deadline - time.monotonic()
                try:
                    status, body = _request("GET", f"http://{host}:{port}/route", None, max(remaining, 0.1),
                                            self._secret)
                except OSError as e:
                    raise KVTransferError(f"bootstrap server {host}:{port} unreachable: {e}") from e
                if status == 200:
                    break
                if status == 401:
                    raise _refused_key(host, port, self._secret)
                if status != 503 or remaining <= 0:
                    raise KVTransferError(f"bootstrap server {host}:{port}: {body.get('error', status)}")
                time.sleep(min(0.05, max(remaining, 0)))
            route = _parse_route(body, host, port)
            with self._lock:
                self._cache[key] = route
            return route

    def invalidate(self, host: str, port: int) -> None:
        with self._lock:
            self._cache.pop((host, port), None)

    def health(self, host: str, port: int) -> bool:
        try:
            return _request("GET", f"http://{host}:{port}/health", None, self.timeout_s)[0] == 200
        except OSError:
            return False


def _parse_route(body: dict, host: str, port: int) -> PrefillRoute:
    tp_size, dp_size, ranks = body.get("tp_size"), body.get("dp_size", 1), body.get("ranks")
    if not isinstance(tp_size, int) or not isinstance(dp_size, int) or dp_size < 1 or not isinstance(ranks, list):
        raise KVTransferError(f"bootstrap server {host}:{port} sent a malformed route: {body}")
    infos = {(info.dp_rank, info.engine_rank): info for info in map(rank_info_from_json, ranks)}
    if sorted(infos) != list(itertools.product(range(dp_size), range(tp_size))):
        raise KVTransferError(f"bootstrap server {host}:{port} sent ranks {sorted(infos)} (DP group, rank) for "
                              f"dp_size {dp_size} x tp_size {tp_size}")
    return PrefillRoute(tp_size, dp_size, infos)
