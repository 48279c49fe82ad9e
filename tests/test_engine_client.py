"""The front's engine client: how a request's messages reach its consumer."""

from __future__ import annotations

import asyncio
import random

from pd.engine.client import _coalesce
from pd.engine.io import TokenOutput


def _messages(rid: str, n: int, finish_at: int) -> list[TokenOutput]:
    out = []
    for i in range(n):
        done = i == finish_at
        out.append(TokenOutput(rid, [100 + i, 200 + i][: 1 + i % 2], 5, i + 1, "length" if done else None,
                               queue_time=0.25 if i == 0 else 0.0))  # fmt: skip
    return out


def test_a_consumer_behind_gets_the_waiting_messages_as_one_with_every_token_in_order():
    """Against the messages themselves: the merged stream carries the same tokens in the same order, the finish of
    the last, the first one's queue time, and nothing after a finish is merged into it."""
    rng = random.Random()
    for _ in range(50):
        n = rng.randint(1, 9)
        msgs = _messages("r", n, finish_at=n - 1)
        queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
        for m in msgs:
            queue.put_nowait(m)
        got = []
        while not queue.empty():
            got.append(_coalesce(queue.get_nowait(), queue))
        assert [t for m in got for t in m.new_token_ids] == [t for m in msgs for t in m.new_token_ids]
        assert got[-1].finish_reason == "length" and all(m.finish_reason is None for m in got[:-1])
        assert got[0].queue_time == 0.25 and got[-1].completion_tokens == n


def test_a_consumer_that_keeps_up_sees_each_message_alone():
    msgs = _messages("r", 4, finish_at=3)
    queue: asyncio.Queue[TokenOutput] = asyncio.Queue()
    seen = []
    for m in msgs:
        queue.put_nowait(m)
        seen.append(_coalesce(queue.get_nowait(), queue))
    assert seen == msgs


def test_token_outputs_cross_the_engine_pipe_as_rows_and_come_back_equal():
    """output_to_row / output_from_row through msgpack (as the engine process sends them) against the original
    objects, on random field values; a row of another length is refused with the counts named."""
    import msgpack
    import pytest

    from pd.engine.io import output_from_row, output_to_row

    rng = random.Random()
    outs = [TokenOutput(f"r{rng.getrandbits(64):x}", [rng.randrange(200000) for _ in range(rng.randint(0, 5))],
                        rng.randint(1, 9999), rng.randint(0, 9999), rng.choice([None, "stop", "length", "error"]),
                        rng.choice([None, rng.randrange(100)]), rng.choice([None, "boom é"]), rng.choice([400, 500]),
                        rng.random(), rng.randint(0, 99))  # fmt: skip
            for _ in range(50)]
    wire = msgpack.unpackb(msgpack.packb({"outputs": [output_to_row(o) for o in outs]}, use_bin_type=True), raw=False)
    assert [output_from_row(r) for r in wire["outputs"]] == outs
    with pytest.raises(ValueError, match="has 3 fields, expected 10"):
        output_from_row(["r", [1], 2])
