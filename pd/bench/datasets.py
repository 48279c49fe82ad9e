"""Benchmark prompts: random token ids, random words, or passages of real prose (corpus.py), with lengths drawn
uniformly from a range. Multi-turn conversations are in conversations.py.

Everything comes from one seeded numpy generator, so the same seed gives the same prompts and output
lengths on every machine, and two servers benchmarked with the same flags see the same workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pd.bench.args import DATASETS
from pd.bench.corpus import prose_words

# Short, frequent English words: most BPE tokenizers encode " word" as one token, so a prompt of N words is
# close to N tokens. The server's own prompt_tokens count (when it reports one) is what the report uses.
_WORDS = np.array(
    """the of and to in is was for on are with as at be by this had not but from or have an they which one you
    were her all she there would their we him been has when who will more no if out so said what up its about into
    than them can only other new some could time these two may then do first any my now such like our over man me
    even most made after also did many before must through back years where much your way well down should because
    each just those people how too little state good very make world still own see men work long get here between
    both life being under never day same another know while last might us great old year off come since against go
    came right used take three""".split()
)


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark prompt.

    prompt: token ids (list of int, each in [0, vocab_size)), a text string, or chat messages (a list of
    {"role", "content"} dicts, the last one the user's).
    prompt_len: tokens in the prompt (for text: words, an estimate until the server reports its count).
    output_len: max_new_tokens to ask for (sent with ignore_eos unless disabled, so the server generates exactly
    this many).
    """

    prompt: list[int] | str | list[dict[str, str]]
    prompt_len: int
    output_len: int


def _check_range(name: str, lo_hi: tuple[int, int]) -> None:
    lo, hi = lo_hi
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must satisfy 1 <= A <= B, got {lo} {hi}")


def draw_lengths(
    rng: np.random.Generator, n: int, input_len_range: tuple[int, int], output_len_range: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Input and output lengths, each int64 [n], uniform over the closed ranges."""
    _check_range("input_len_range", input_len_range)
    _check_range("output_len_range", output_len_range)
    in_lens = rng.integers(input_len_range[0], input_len_range[1], size=n, endpoint=True)
    out_lens = rng.integers(output_len_range[0], output_len_range[1], size=n, endpoint=True)
    return in_lens, out_lens


def random_token_requests(
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """`num_prompts` prompts of random token ids, uniform over [0, vocab_size).

    Raises ValueError for an empty or inverted length range or vocab_size < 1.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens, out_lens = draw_lengths(rng, num_prompts, input_len_range, output_len_range)
    # One draw for all prompts, then split: no per-token Python work.
    ids = rng.integers(0, vocab_size, size=int(in_lens.sum()))
    prompts = np.split(ids, np.cumsum(in_lens)[:-1])
    return [
        BenchRequest(prompt=p.tolist(), prompt_len=int(n_in), output_len=int(n_out))
        for p, n_in, n_out in zip(prompts, in_lens, out_lens, strict=True)
    ]


def random_text_requests(
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """`num_prompts` prompts of random common English words; the input length counts words (about tokens).

    Raises ValueError for an empty or inverted length range.
    """
    rng = np.random.default_rng(seed)
    in_lens, out_lens = draw_lengths(rng, num_prompts, input_len_range, output_len_range)
    words = _WORDS[rng.integers(0, len(_WORDS), size=int(in_lens.sum()))]
    prompts = np.split(words, np.cumsum(in_lens)[:-1])
    return [
        BenchRequest(prompt=" ".join(p.tolist()), prompt_len=int(n_in), output_len=int(n_out))
        for p, n_in, n_out in zip(prompts, in_lens, out_lens, strict=True)
    ]


def passages(rng: np.random.Generator, lengths: np.ndarray) -> list[str]:
    """One passage of real prose per entry of `lengths` (words, int [n]), each from a random place in the corpus
    (wrapping around its end)."""
    words = np.asarray(prose_words())
    starts = rng.integers(0, len(words), size=len(lengths))
    spans = (np.arange(start, start + n) for start, n in zip(starts, lengths, strict=True))
    return [" ".join(words.take(span, mode="wrap").tolist()) for span in spans]


def python_docs_requests(
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """`num_prompts` passages of the Python documentation; the input length counts words.

    Raises ValueError for an empty or inverted length range, corpus.CorpusUnavailableError without pydoc_data.
    """
    rng = np.random.default_rng(seed)
    in_lens, out_lens = draw_lengths(rng, num_prompts, input_len_range, output_len_range)
    return [
        BenchRequest(prompt=text, prompt_len=int(n_in), output_len=int(n_out))
        for text, n_in, n_out in zip(passages(rng, in_lens), in_lens, out_lens, strict=True)
    ]


def make_requests(
    dataset: str,
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int,
    vocab_size: int | None = None,
) -> list[BenchRequest]:
    """The prompts of a single-turn dataset (one of DATASETS but multi-turn); random-ids needs `vocab_size`."""
    if dataset == "random-ids":
        if vocab_size is None:
            raise ValueError("the random-ids dataset needs a vocab size")
        return random_token_requests(num_prompts, input_len_range, output_len_range, vocab_size, seed)
    if dataset == "random-text":
        return random_text_requests(num_prompts, input_len_range, output_len_range, seed)
    if dataset == "python-docs":
        return python_docs_requests(num_prompts, input_len_range, output_len_range, seed)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
