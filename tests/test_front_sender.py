"""FrontSender.wait_outputs_written, which the engine loop calls before its bookkeeping after a step that ended
requests: it returns once the outputs are in the front's pipe (the oracle: the front's end reads them whole), and
returns after its timeout when the front does not read (a stalled front cannot hold the loop)."""

from __future__ import annotations

import multiprocessing
import time

import msgpack

from pd.engine.engine_process import FrontSender


def test_waits_until_the_outputs_are_written() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    sender = FrontSender(writer, 1)
    payload = {"outputs": [["r", [5], 3, 1, "length"]], "stats": {}}
    start = time.monotonic()
    sender.send(payload, rows=True)
    sender.wait_outputs_written(5.0)
    assert time.monotonic() - start < 1.0, "the wait did not end with the write"
    assert reader.poll(0), "the outputs were not written when the wait returned"
    assert msgpack.unpackb(reader.recv_bytes(), raw=False) == payload
    start = time.monotonic()
    sender.wait_outputs_written(5.0)  # nothing queued: at once
    assert time.monotonic() - start < 0.5


def test_a_front_that_does_not_read_costs_the_timeout_only() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    sender = FrontSender(writer, 1)
    big = {"outputs": [["r", list(range(200_000)), 3, 1, None]], "stats": {}}  # more than any pipe holds
    sender.send(big, rows=True)
    start = time.monotonic()
    sender.wait_outputs_written(0.2)
    waited = time.monotonic() - start
    assert 0.15 < waited < 2.0, waited
    assert sender.outputs_waiting_s(time.monotonic()) > 0  # still being written: the front is not reading
    received = msgpack.unpackb(reader.recv_bytes(), raw=False)  # the front reads again: the write completes
    assert received == {"outputs": [["r", list(range(200_000)), 3, 1, None]], "stats": {}}
    sender.wait_outputs_written(5.0)
    assert sender.outputs_waiting_s(time.monotonic()) == 0
