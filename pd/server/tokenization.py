"""Tokenizer work off the event loop: prompts are tokenized (and chat templates rendered, large outputs
detokenized) on worker threads, so /health and every other request are answered while a long prompt is cut up.

A thread only helps where the GIL is released. Hugging Face fast tokenizers release it inside the Rust backend's
`encode_batch`, but not while turning the ids into a Python list, which for a million tokens holds it for well
over 100 ms. So a text is encoded with the backend's `encode_batch`, its length is checked while the ids are
still in Rust, and only a prompt that fits the context becomes a list. A tokenizer without a Rust backend, or
whose backend is set to truncate or pad (Hugging Face's own `encode` would undo that), runs its `encode` on the
worker instead.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pd.server.protocol import ApiError

T = TypeVar("T")
# Several long prompts may be tokenized at once, each on a core; the event loop keeps one for itself.
MAX_WORKERS = max(1, min(4, (os.cpu_count() or 2) - 1))


class PromptTooLongError(ApiError):
    """A text prompt with more tokens than the context holds (400); raised before its ids are materialised."""

    def __init__(self, what: str, n_tokens: int, context_length: int) -> None:
        super().__init__(f"{what} is {n_tokens} tokens, more than the context length ({context_length}); shorten it")


class TokenizerWorkers:
    """Runs a Hugging Face tokenizer's calls on a small thread pool. `close()` stops it."""

    def __init__(self, tokenizer: Any, max_workers: int = MAX_WORKERS) -> None:
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="tokenizer")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on a worker thread; its exception is raised here."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def encode(
        self, text: str, max_tokens: int, *, add_special_tokens: bool = True, what: str = "the prompt"
    ) -> list[int]:
        """The ids `tokenizer.encode(text, add_special_tokens=...)` gives. Raises PromptTooLongError (naming
        `what`) when there are more than max_tokens of them."""
        return await self.run(self._encode, text, max_tokens, add_special_tokens, what)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _encode(self, text: str, max_tokens: int, add_special_tokens: bool, what: str) -> list[int]:
        backend = self._plain_backend()
        if backend is None:
            ids = list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
            if len(ids) > max_tokens:
                raise PromptTooLongError(what, len(ids), max_tokens)
            return ids
        # encode_batch, unlike encode, releases the GIL (it is also what Hugging Face's encode calls).
        encoding = backend.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        if len(encoding) > max_tokens:
            raise PromptTooLongError(what, len(encoding), max_tokens)
        return list(encoding.ids)

    def _plain_backend(self) -> Any | None:
        """The Rust tokenizer when calling it gives what the Hugging Face wrapper's encode gives, else None.

        The wrapper switches truncation and padding off and sets encode_special_tokens from split_special_tokens
        on every call; a backend already in that state needs no wrapper.
        """
        if not getattr(self.tokenizer, "is_fast", False):
            return None
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.truncation is not None or backend.padding is not None:
            return None
        if backend.encode_special_tokens != bool(getattr(self.tokenizer, "split_special_tokens", False)):
            return None
        return backend
