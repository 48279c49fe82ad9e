"""/tokenize and /detokenize (pd.server.tokenize_api) against the model's Hugging Face tokenizer in this process,
on random texts; and the ids /tokenize gives are the ones /generate hands the engine for the same text."""

from __future__ import annotations

import random
import secrets
from typing import Any

from fastapi.testclient import TestClient

from pd.server.app import create_app
from pd.server_args import ServerArgs
from tests.test_http_api import CONTEXT, MODEL, FakeEngineClient, make_app
from tests.test_http_api import tokenizer as tokenizer  # noqa: F401  (session fixture)

WORDS = ["the", "capital", "of", "France", "is", "Paris", "naïve", "café", "🙂", "\n", "  ", "<|", "|>", "1234"]


def _texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(WORDS) + rng.choice(["", " "]) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def test_tokenize_and_detokenize_give_the_tokenizers_answers(tokenizer: Any) -> None:
    rng = random.Random(secrets.randbits(32))
    app, fake = make_app(tokenizer)
    client = TestClient(app)
    texts = _texts(rng, 6)
    for route in ("/tokenize", "/v1/tokenize"):
        for special in (True, False):
            r = client.post(route, json={"prompt": texts[0], "add_special_tokens": special})
            expected = tokenizer.encode(texts[0], add_special_tokens=special)
            assert r.status_code == 200 and r.json() == {"tokens": expected, "count": len(expected),
                                                         "max_model_len": CONTEXT}  # fmt: skip
        r = client.post(route, json={"prompt": texts})  # a batch; special tokens by default
        expected_batch = [tokenizer.encode(t) for t in texts]
        counts = [len(i) for i in expected_batch]
        assert r.json() == {"tokens": expected_batch, "count": counts, "max_model_len": CONTEXT}
    for route in ("/detokenize", "/v1/detokenize"):
        for skip in (True, False):
            ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 40))] + tokenizer.all_special_ids
            rng.shuffle(ids)
            r = client.post(route, json={"tokens": ids, "skip_special_tokens": skip})
            assert r.status_code == 200 and r.json() == {"text": tokenizer.decode(ids, skip_special_tokens=skip)}
        rows = [tokenizer.encode(t) for t in texts]
        r = client.post(route, json={"tokens": rows})
        assert r.json() == {"text": [tokenizer.decode(i, skip_special_tokens=True) for i in rows]}
    # What /generate sends the engine for a text is what /tokenize answers for it.
    short = " ".join(rng.choice(WORDS) for _ in range(4))  # within the fake engine's context
    assert client.post("/generate", json={"text": short, "sampling_params": {"max_new_tokens": 1}}).is_success
    tokens = client.post("/tokenize", json={"prompt": short}).json()["tokens"]
    assert [int(t) for t in fake.requests[-1].input_ids] == tokens


def test_bad_tokenize_requests_answer_400_saying_why(tokenizer: Any) -> None:
    app, _ = make_app(tokenizer)
    client = TestClient(app)
    for route, body, why in [("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": 5}, "prompt"),
                             ("/detokenize", {"tokens": [1, -1]}, "-1 is not a token id"),
                             ("/detokenize", {"tokens": [10**9]}, "not a token id"),
                             ("/detokenize", {"tokens": ["a"]}, "tokens")]:  # fmt: skip
        r = client.post(route, json=body)
        assert r.status_code == 400 and why in r.json()["error"]["message"], (route, body, r.text)
    # Without a tokenizer (--skip-tokenizer-init) there is nothing to tokenize with.
    fake = FakeEngineClient(len(tokenizer), tokenizer.eos_token_id)
    bare = TestClient(create_app(fake, None, ServerArgs(model_path="/models/fake", served_model_name=MODEL,
                                                        device="cpu", skip_tokenizer_init=True)))  # fmt: skip
    for route, body in [("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})]:
        r = bare.post(route, json=body)
        assert r.status_code == 400 and "--skip-tokenizer-init" in r.json()["error"]["message"]
