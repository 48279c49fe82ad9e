"""IncrementalDetokenizer against whole-sequence decoding (the oracle), on random multilingual text whose
characters span several byte-level tokens, fed in random chunk sizes."""

from __future__ import annotations

import random
from typing import Any

import pytest

from pd.server.detokenizer import IncrementalDetokenizer
from tests.tiny_checkpoints import write_tokenizer

_POOLS = (
    "abcdefghijklmnopqrstuvwxyz      ,.!?\n",
    "éèüößñçå",
    "".join(chr(c) for c in range(0x4E00, 0x4E40)),  # CJK: 3 bytes each
    "".join(chr(c) for c in range(0x1F600, 0x1F620)),  # emoji: 4 bytes each
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    write_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(rng.choice(_POOLS)) for _ in range(n))


def random_chunks(rng: random.Random, ids: list[int]) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(ids):
        k = rng.randint(1, 4)
        chunks.append(ids[i : i + k])
        i += k
    return chunks


def reference_stop(tokenizer: Any, ids: list[int], stops: list[str], no_stop_trim: bool) -> tuple[str, str | None, int]:
    """Token-by-token loop: decode every prefix from scratch, stop at the first prefix containing a stop."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            pos, stop = min(hits)
            return (text[: pos + len(stop)] if no_stop_trim else text[:pos]), stop, k
    return tokenizer.decode(ids), None, len(ids)


@pytest.mark.parametrize("seed", range(8))
def test_incremental_text_equals_full_decode_on_random_unicode(tokenizer: Any, seed: int) -> None:
    rng = random.Random(seed)
    prompt = tokenizer.encode(random_text(rng, 10))
    original = random_text(rng, 60)
    ids = tokenizer.encode(original)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = []
    for chunk in random_chunks(rng, ids):
        step = detok.add(chunk)
        assert step.stop is None and step.tokens_used == len(chunk)
        assert not detok.text.endswith("\ufffd"), "a partial character was emitted"
        pieces.append(step.delta)
    pieces.append(detok.finish().delta)
    assert "".join(pieces) == tokenizer.decode(ids) == original


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_stop_strings_match_token_by_token_reference(tokenizer: Any, seed: int, no_stop_trim: bool) -> None:
    rng = random.Random(seed)
    original = random_text(rng, 50)
    ids = tokenizer.encode(original)
    stops = []
    for _ in range(rng.randint(1, 3)):
        start = rng.randrange(len(original) - 4)
        stops.append(original[start : start + rng.randint(1, 4)])
    stops.append("never-occurs-\x00")
    stops = [s for s in stops if s.strip("\x00")]
    want_text, want_stop, want_used = reference_stop(tokenizer, ids, stops, no_stop_trim)

    detok = IncrementalDetokenizer(tokenizer, [], stop=stops, no_stop_trim=no_stop_trim)
    deltas, used = [], 0
    for chunk in random_chunks(rng, ids):
        step = detok.add(chunk)
        deltas.append(step.delta)
        used += step.tokens_used
        if step.stop is not None:
            break
    else:
        deltas.append(detok.finish().delta)
    assert ("".join(deltas), detok.stop_matched, used) == (want_text, want_stop, want_used)


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer: Any) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], stop=["STOP"])
    assert detok.add(tokenizer.encode("abc ST")).delta == "abc "  # "ST" could begin "STOP"
    assert detok.add(tokenizer.encode("A")).delta == "STA"  # it did not
    step = detok.add(tokenizer.encode("xSTOPyz"))
    assert (step.delta, step.stop) == ("x", "STOP")
    assert detok.text == "abc STAx"


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer: Any, skip: bool) -> None:
    ids = tokenizer.encode("hi") + [tokenizer.eos_token_id] + tokenizer.encode("yo")
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    text = "".join(detok.add([t]).delta for t in ids) + detok.finish().delta
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in text) is not skip
