"""Incremental detokenization of one request's output, with stop-string detection.

Decoding only the new token in isolation is wrong for two reasons: byte-level BPE splits multi-byte UTF-8
characters across tokens (a lone piece decodes to U+FFFD), and SentencePiece drops a token's leading space at
the start of a sequence. So, like SGLang and vLLM, each step decodes a short window `ids[prefix:]` and emits
what it adds beyond `ids[prefix:read]`; the window starts inside the prompt's tail so the first output token
has left context. A character still incomplete at the end (U+FFFD) is held back until it completes.

Stop strings are matched on the decoded text. Text that could be the start of a stop string is held back too,
so a stream never emits characters that a later stop match would have to take back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Prompt tokens kept as left context for the first output tokens (SGLang uses the same count).
PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


# slots, not frozen: a frozen dataclass's __init__ costs ~8x more (one per streamed event).
@dataclass(slots=True)
class DetokenizeStep:
    """What one `add` call produced.

    delta: newly visible text (may be empty while a character or a possible stop string is pending).
    stop: the stop string that matched, or None.
    tokens_used: how many of the given tokens belong to the output; fewer than given only when a stop string
        completed before the last of them (the rest are discarded).
    """

    delta: str
    stop: str | None
    tokens_used: int


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, finding stop strings as it goes.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with `decode(ids, skip_special_tokens=...)`).
        prompt_ids: the prompt; only its last PROMPT_CONTEXT_TOKENS ids are kept, as decoding context.
        skip_special_tokens: drop special tokens (EOS, chat markers) from the text.
        stop: stop strings; the first one to appear ends the text.
        no_stop_trim: keep the matched stop string in the text (default: cut it off).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        no_stop_trim: bool = False,
    ) -> None:
        assert all(stop), "empty stop strings are rejected at request validation"
        self._tokenizer = tokenizer
        # A fast tokenizer's decode (clean-up off) is its Rust backend's decode behind ~2 us of Python per call,
        # and this runs twice per streamed event: call the backend directly.
        self._backend = _rust_backend(tokenizer)
        self._skip_special = skip_special_tokens
        self._stop = tuple(stop)
        self._no_stop_trim = no_stop_trim
        self._ids: list[int] = [int(t) for t in prompt_ids[max(0, len(prompt_ids) - PROMPT_CONTEXT_TOKENS) :]]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._window_emitted = 0  # chars of the current window already added to _text
        self._text = ""  # decoded output so far (excluding held-back partial characters)
        self._visible = 0  # length of the prefix of _text already returned
        self.stop_matched: str | None = None

    @property
    def text(self) -> str:
        """All text returned so far (the concatenation of every delta)."""
        return self._text[: self._visible]

    def add(self, token_ids: Sequence[int]) -> DetokenizeStep:
        """Consume new output tokens; returns the newly visible text and any stop match.

        Must not be called after a stop string matched.
        """
        assert self.stop_matched is None, "add() after a stop string matched"
        if not token_ids:
            return DetokenizeStep("", None, 0)
        saved = (
            len(self._ids),
            self._prefix_offset,
            self._read_offset,
            self._window_emitted,
            self._text,
            self._visible,
        )
        before = self._visible
        self._decode_more(token_ids)
        if self._find_stop(before) and len(token_ids) > 1:
            # Rare (several tokens in one message and a stop inside them): replay one token at a time to
            # learn which token completed the stop, so output_ids and the token count end there.
            n_ids, self._prefix_offset, self._read_offset, self._window_emitted, self._text, self._visible = saved
            del self._ids[n_ids:]
            self.stop_matched = None
            used = 0
            while self.stop_matched is None:
                step_start = self._visible
                self._decode_more([token_ids[used]])
                used += 1
                self._find_stop(step_start)
            return DetokenizeStep(self._text[before : self._visible], self.stop_matched, used)
        return DetokenizeStep(self._text[before : self._visible], self.stop_matched, len(token_ids))

    def finish(self) -> DetokenizeStep:
        """Flush everything held back (an unfinished character decodes as U+FFFD); call once at the end."""
        before = self._visible
        if self.stop_matched is None:
            if self._read_offset < len(self._ids):
                self._text += self._decode_window(force=True)
            if not self._find_stop(before):
                self._visible = len(self._text)
        return DetokenizeStep(self._text[before : self._visible], self.stop_matched, 0)

    # ---- internals ----
    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False)

    def _decode_window(self, force: bool = False) -> str:
        """Text that ids[read_offset:] add after ids[prefix_offset:read_offset] and that was not returned yet.

        While the window ends inside a character (U+FFFD at the end), only the complete characters before it
        are returned and the offsets stay put; they advance once the window ends cleanly (or on `force`).
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        done = len(prefix_text) + self._window_emitted
        if full_text.endswith(_REPLACEMENT_CHAR) and not force:
            new = full_text.rstrip(_REPLACEMENT_CHAR)[done:]
            self._window_emitted += len(new)
            return new
        new = full_text[done:]
        if force or len(full_text) > len(prefix_text):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._window_emitted = 0
        return new

    def _decode_more(self, token_ids: Sequence[int]) -> None:
        self._ids.extend(token_ids)
        self._text += self._decode_window()
        self._visible = len(self._text) - self._stop_prefix_len()

    def _find_stop(self, start: int) -> bool:
        """Look for a stop string in the text from `start` (the end of what was already returned: an earlier
        start is impossible, because a possible stop prefix is always held back)."""
        if not self._stop:
            return False
        hits = [(pos, s) for s in self._stop if (pos := self._text.find(s, start)) != -1]
        if not hits:
            return False
        pos, stop = min(hits)
        self.stop_matched = stop
        self._text = self._text[: pos + len(stop)] if self._no_stop_trim else self._text[:pos]
        self._visible = len(self._text)
        return True

    def _stop_prefix_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best


def _rust_backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a Hugging Face fast tokenizer, or None (a slow tokenizer, a stand-in)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None
