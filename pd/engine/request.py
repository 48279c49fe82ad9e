"""A request's life inside the engine: its tokens, its KV pages and why it finished."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from pd.engine.io import SamplingParams

if TYPE_CHECKING:
    from pd.engine.radix_cache import Node


class ReqState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    TRANSFERRING = "transferring"  # PD: KV pages moving between prefill and decode
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: lists of them are searched by identity, not by every field
class Req:
    rid: str
    # The prompt as int64 (what the front parsed /generate's input_ids into): a prompt forward's batch joins numpy
    # slices of it, and the prefix cache looks up its pages from it; `prompt_ids` is made from it only when needed.
    prompt_array: np.ndarray
    sampling: SamplingParams
    max_total_len: int  # prompt + new tokens may not exceed this (context length, or prompt + max_new_tokens)
    kv_tokens: int = 0  # KV slots reserved on admission (a prefill instance keeps only the prompt's)
    output_ids: list[int] = field(default_factory=list)
    state: ReqState = ReqState.WAITING
    row: int = -1  # row in the slot table while running
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (the first pages of `pages`)
    cache_node: Node | None = None  # where its cached prefix ends in the prefix tree (locked while it runs)
    kv_trusted: bool = True  # False after a failure that may have left garbage in its KV: never cached then
    finish_reason: str | None = None
    matched_stop: int | None = None
    seed: int = 0  # the request's sampling seed (its own, or one the engine drew)
    pending: int = 0  # tokens sampled on the device by a step in flight, not yet in output_ids
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    num_sent: int = 0  # output tokens already reported to the front
    kv_sent: bool = False  # prefill: the KV pages have been handed to the transfer engine
    every_token: bool = True  # report each sampled token (else the first one and the end only)
    stream_interval: int = 1  # with every_token: report once this many tokens wait (the first one at once)
    _prompt_ids: list[int] | None = field(default=None, repr=False)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_array)

    @property
    def prompt_ids(self) -> list[int]:
        """The prompt as Python ints, made on first use (a finished request's prefix-cache insert, a PD transfer's
        fingerprint): made on arrival, a 16 x 1024-token burst's ints cost the engine ~1 ms before its forward on an
        H100 host."""
        if self._prompt_ids is None:
            self._prompt_ids = self.prompt_array.tolist()
        return self._prompt_ids

    @property
    def fill_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def next_input_ids(self, n: int) -> np.ndarray | list[int]:
        """The n tokens after those already in the cache: a prompt chunk (a view of prompt_array), or the last
        sampled token (a list)."""
        prompt_len = self.prompt_len
        if self.num_computed < prompt_len:
            return self.prompt_array[self.num_computed : self.num_computed + n]
        start = self.num_computed - prompt_len
        return self.output_ids[start : start + n]

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prompt_len
