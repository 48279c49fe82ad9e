"""The multi-turn dataset: conversations whose user turns are passages of real prose (corpus.py).

Each turn is sent with every earlier turn and the model's answers to them, as a chat client keeps its history
(SGLang's and vLLM's multi-turn benchmarks do the same), so later turns carry long, shared prefixes. The turns of
one conversation go one after another: a turn is sent once the answer to the previous one is complete.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from pd.bench.client import RequestOutput
from pd.bench.datasets import BenchRequest, draw_lengths, passages

# Sends one request (under the run's concurrency limit) and returns what it measured.
Send = Callable[[BenchRequest], Awaitable[RequestOutput]]


@dataclass(frozen=True)
class Conversation:
    """user_turns: the user's messages, in order. turn_lens: words in each. output_lens: max tokens per answer."""

    user_turns: tuple[str, ...]
    turn_lens: tuple[int, ...]
    output_lens: tuple[int, ...]

    def opening(self) -> BenchRequest:
        """The first turn alone (what a warm-up sends)."""
        return BenchRequest([{"role": "user", "content": self.user_turns[0]}], self.turn_lens[0], self.output_lens[0])


def multi_turn_conversations(
    num_conversations: int,
    num_turns: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
) -> list[Conversation]:
    """`num_conversations` conversations of `num_turns` user turns; turn and answer lengths are drawn per turn
    from the ranges (words and tokens). Raises ValueError for a bad range, CorpusUnavailableError without the
    corpus."""
    assert num_turns >= 1
    rng = np.random.default_rng(seed)
    in_lens, out_lens = draw_lengths(rng, num_conversations * num_turns, input_len_range, output_len_range)
    texts = passages(rng, in_lens)
    return [
        Conversation(
            user_turns=tuple(texts[i : i + num_turns]),
            turn_lens=tuple(int(n) for n in in_lens[i : i + num_turns]),
            output_lens=tuple(int(n) for n in out_lens[i : i + num_turns]),
        )
        for i in range(0, num_conversations * num_turns, num_turns)
    ]


async def converse(conversation: Conversation, send: Send) -> list[RequestOutput]:
    """Send the turns one after another, each with the history so far; one output per turn, in order.

    A failed turn ends the conversation (the next turns would need its answer); they are recorded as failed, so
    the report still counts every turn of the dataset.
    """
    messages: list[dict[str, str]] = []
    outputs: list[RequestOutput] = []
    history_len = 0  # tokens before this turn: the server's count once it reports one, else words
    for text, n_in, n_out in zip(conversation.user_turns, conversation.turn_lens, conversation.output_lens,
                                 strict=True):  # fmt: skip
        messages.append({"role": "user", "content": text})
        out = await send(BenchRequest(list(messages), history_len + n_in, n_out))
        outputs.append(out)
        if not out.success:
            skipped = len(conversation.user_turns) - len(outputs)
            outputs += [RequestOutput(prompt_len=0, error="an earlier turn of its conversation failed")
                        for _ in range(skipped)]  # fmt: skip
            break
        messages.append({"role": "assistant", "content": out.generated_text})
        history_len = out.prompt_len + out.output_tokens
    return outputs
