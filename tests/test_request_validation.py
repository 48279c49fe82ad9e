"""Request validation closes over the whole request, and one request's failure stays its own.

- Every number a request forwards has a range checked at the front: 400 naming the field, where an integer past
  64 bits used to reach msgpack and answer 500 (`OverflowError`).
- Sampling parameters are normalised as SGLang does (temperature < 1e-6 is greedy; top_k 0 or >= vocab is off).
- An unknown key inside `sampling_params` is a 400 naming the nearest known key; unknown top-level fields are
  accepted (SGLang routers send their own) and logged once per name.
- Unset sampling parameters come from the model's generation_config.json (--sampling-defaults model), or are
  OpenAI's (--sampling-defaults openai).
- In the engine, a request whose row cannot be sampled ends alone with finish "error"; the greedy requests beside
  it produce exactly what they produce alone (the oracle). Through a real `pd serve`, numerically extreme
  requests beside four greedy ones all succeed.

The front tests use the fake engine of tests/test_http_api.py (fast); one real server is shared per module.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pd.engine.io import GenerateRequest, SamplingParams, TokenOutput
from pd.server.app import create_app
from pd.server.protocol import token_array
from pd.server_args import ServerArgs
from tests.server_process import pd_serve
from tests.test_http_api import FakeEngineClient
from tests.tiny_checkpoints import VOCAB, make_checkpoint, write_tokenizer

MODEL_DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.0}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory with a tokenizer and a generation_config.json carrying sampling defaults."""
    path = tmp_path_factory.mktemp("model")
    write_tokenizer(str(path))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **MODEL_DEFAULTS}))
    return str(path)


def make_client(model_dir: str, sampling_defaults: str = "model") -> tuple[TestClient, FakeEngineClient]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    fake = FakeEngineClient(len(tok), tok.eos_token_id)
    flag = {} if sampling_defaults == "model" else {"sampling_defaults": sampling_defaults}  # "model": the default
    args = ServerArgs(model_path=model_dir, served_model_name="m", device="cpu", **flag)
    return TestClient(create_app(fake, tok, args)), fake


@pytest.fixture(scope="module")
def app_fake(model_dir: str) -> tuple[TestClient, FakeEngineClient]:
    return make_client(model_dir)


def _gen(sampling: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    return {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 2, **(sampling or {})}, **top}


# Fields forwarded to the engine, each out of its range (64-bit and beyond): 400 naming the field.
OUT_OF_RANGE = [
    ("/generate", _gen(bootstrap_host="h", bootstrap_port=8998, bootstrap_room=2**64), "bootstrap_room: must be"),
    ("/generate", _gen(bootstrap_host="h", bootstrap_port=2**70, bootstrap_room=1), "bootstrap_port: must be"),
    ("/generate", _gen(bootstrap_host="h", bootstrap_port=8998, bootstrap_room=-1), "bootstrap_room: must be"),
    ("/generate", _gen({"top_k": 2**63}), "sampling_params.top_k: must be a 64-bit integer"),
    ("/generate", _gen({"top_k": -2**70}), "sampling_params.top_k: must be -1"),
    ("/generate", _gen({"max_new_tokens": 2**64}), "sampling_params.max_new_tokens: must be a 64-bit integer"),
    ("/generate", _gen({"seed": 2**64}), "sampling_params.seed: must be a 64-bit integer"),
    ("/generate", _gen({"sampling_seed": -(2**63) - 1}), "sampling_params.sampling_seed: must be a 64-bit"),
    ("/generate", _gen({"stop_token_ids": [2**64]}), "sampling_params.stop_token_ids[0]: must be a 64-bit"),
    ("/generate", {"input_ids": [[1], [2]], "bootstrap_room": [1, 2**65]}, "bootstrap_room[1]: must be"),
    ("/v1/completions", {"prompt": "a", "bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 2**64},
     "bootstrap_room: must be"),
    ("/v1/completions", {"prompt": "a", "top_k": 2**64}, "top_k: must be a 64-bit integer"),
    ("/v1/completions", {"prompt": "a", "seed": -(2**64)}, "seed: must be a 64-bit integer"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 2**64}, "max_tokens: must be a 64-bit integer"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 2**64}, "max_completion_tokens: must be a 64-bit"),
    ("/v1/chat/completions", {**CHAT, "stop_token_ids": [2**63]}, "stop_token_ids[0]: must be a 64-bit"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "message"), OUT_OF_RANGE)
def test_out_of_range_numbers_answer_400_naming_the_field(
    app_fake: tuple[TestClient, FakeEngineClient], path: str, body: dict[str, Any], message: str
) -> None:
    client, fake = app_fake
    before = len(fake.requests)
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"], r.json()
    assert len(fake.requests) == before  # nothing reached the engine


@pytest.mark.parametrize(
    ("raw", "message"),
    [('"temperature": Infinity', "temperature: must be a finite number"),
     ('"top_p": NaN', "top_p: must be a finite number"),
     ('"min_p": -Infinity', "min_p: must be a finite number")],
)  # fmt: skip
def test_non_finite_floats_answer_400(app_fake: tuple[TestClient, FakeEngineClient], raw: str, message: str) -> None:
    """Python's json reads NaN and Infinity, so they must be refused by range, not by the parser."""
    client, _ = app_fake
    r = client.post("/generate", content='{"input_ids": [5], "sampling_params": {' + raw + "}}")
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    ("sampling", "temperature", "top_k"),
    [({"temperature": 1e-50}, 0.0, 20), ({"temperature": 9e-7, "top_k": 0}, 0.0, -1),
     ({"temperature": 0.7, "top_k": 2**63 - 1}, 0.7, -1), ({"temperature": 0.7, "top_k": VOCAB}, 0.7, -1),
     ({"temperature": 0.7, "top_k": -1}, 0.7, -1), ({"temperature": 0.7, "top_k": 3}, 0.7, 3)],
)  # fmt: skip
def test_sampling_params_are_normalised_like_sglang(
    app_fake: tuple[TestClient, FakeEngineClient], sampling: dict[str, Any], temperature: float, top_k: int
) -> None:
    """temperature < 1e-6 -> 0 (greedy); top_k 0 or >= the vocabulary (the tokenizer's 256 bytes + ChatML) -> -1."""
    client, fake = app_fake
    assert client.post("/generate", json=_gen(sampling)).status_code == 200
    sp = fake.requests[-1].sampling
    assert (sp.temperature, sp.top_k) == (temperature, top_k)


@pytest.mark.parametrize(
    ("key", "near"), [("max_tokens", "max_new_tokens"), ("temprature", "temperature"), ("topk", "top_k")]
)
def test_unknown_sampling_key_answers_400_with_the_nearest_known_name(
    app_fake: tuple[TestClient, FakeEngineClient], key: str, near: str
) -> None:
    client, _ = app_fake
    r = client.post("/generate", json={"text": "a", "sampling_params": {key: 3}})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert f"sampling_params: unknown sampling parameter {key!r}; did you mean {near}?" in message, message


def test_unknown_top_level_fields_are_accepted_and_logged_once_per_name(
    model_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = make_client(model_dir)
    with caplog.at_level(logging.WARNING, logger="pd.server.protocol"):
        for _ in range(3):
            assert client.post("/generate", json=_gen(some_future_field=1, other_field="x")).status_code == 200
            assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "xyz": 1}).status_code == 200
    logged = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert sorted(logged) == sorted(
        [f"/generate: ignoring the unknown field {k!r} (logged once)" for k in ("some_future_field", "other_field")]
        + ["/v1/completions: ignoring the unknown field 'xyz' (logged once)"]
    )


# ---- sampling defaults (--sampling-defaults model|openai)
def _sampling(sp: SamplingParams) -> dict[str, float]:
    return {"temperature": sp.temperature, "top_p": sp.top_p, "top_k": sp.top_k, "min_p": sp.min_p}


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_unset_sampling_params_come_from_generation_config(
    app_fake: tuple[TestClient, FakeEngineClient], path: str
) -> None:
    client, fake = app_fake
    body = {"/generate": _gen(), "/v1/completions": {"prompt": "a", "max_tokens": 2}, "/v1/chat/completions": CHAT}
    assert client.post(path, json=body[path]).status_code == 200
    model = {k: v for k, v in MODEL_DEFAULTS.items() if k != "repetition_penalty"}
    assert _sampling(fake.requests[-1].sampling) == model
    # What the request sets wins; the rest stay the model's.
    set_one = {"/generate": _gen({"temperature": 1.0}), "/v1/completions": {"prompt": "a", "temperature": 1.0},
               "/v1/chat/completions": {**CHAT, "temperature": 1.0}}  # fmt: skip
    assert client.post(path, json=set_one[path]).status_code == 200
    assert _sampling(fake.requests[-1].sampling) == {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "min_p": 0.05}


def test_sampling_defaults_openai_ignores_generation_config(model_dir: str) -> None:
    client, fake = make_client(model_dir, sampling_defaults="openai")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert _sampling(fake.requests[-1].sampling) == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}


def test_sampling_defaults_flag_parses_and_rejects_other_values() -> None:
    assert ServerArgs.from_cli(["--sampling-defaults", "openai", "--device", "cpu"]).sampling_defaults == "openai"
    assert ServerArgs.from_cli(["--device", "cpu"]).sampling_defaults == "model"
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--sampling-defaults", "hf"])


# ---- per-request isolation in the engine
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_checkpoint("llama", str(tmp_path_factory.mktemp("llama") / "llama"), seed=3)


def test_a_request_that_cannot_be_sampled_ends_alone_and_the_others_match_their_solo_run(llama_dir: str) -> None:
    """Engine-level (no front to normalise): a nan temperature makes its row unsamplable. That request ends with
    finish "error"; four greedy requests in the same batches give exactly their solo outputs; extreme but valid
    parameters (temperature 1e-50, top_k 2**64) sample like greedy."""
    from pd.engine.llm import LLM

    llm = LLM(llama_dir, max_total_tokens=4096)
    prompts = [[(7 * i + j) % VOCAB for j in range(5 + i)] for i in range(4)]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    solo = [llm.generate([p], greedy)[0] for p in prompts]
    sched = llm.scheduler
    reqs = [GenerateRequest(f"g{i}", p, greedy) for i, p in enumerate(prompts)]
    reqs.append(GenerateRequest("nan", prompts[0], SamplingParams(max_new_tokens=6, temperature=float("nan"))))
    reqs.append(GenerateRequest("tiny", prompts[1], SamplingParams(max_new_tokens=6, temperature=1e-50)))
    reqs.append(GenerateRequest("huge_k", prompts[2], SamplingParams(max_new_tokens=6, temperature=1.0, top_k=2**64,
                                                                    seed=5)))  # fmt: skip
    for req in reqs:
        assert sched.add(req) is None
    outs: dict[str, list[TokenOutput]] = {}
    while sched.has_work:
        for out in sched.step():
            outs.setdefault(out.rid, []).append(out)
    assert [sum((o.new_token_ids for o in outs[f"g{i}"]), []) for i in range(4)] == solo
    assert all(outs[f"g{i}"][-1].finish_reason == "length" for i in range(4))
    failed = outs["nan"][-1]
    assert failed.finish_reason == "error" and "sampling failed" in (failed.error or ""), failed
    assert sum((o.new_token_ids for o in outs["tiny"]), []) == solo[1]
    assert outs["huge_k"][-1].finish_reason in ("length", "stop")
    assert sched.pool.num_free == sched.pool.num_pages  # every request, the failed one too, gave its pages back


@pytest.fixture(scope="module")
def server(llama_dir: str) -> Iterator[str]:
    with pd_serve(llama_dir) as url:
        yield url


def test_real_server_answers_400_not_500_for_integers_past_64_bits(server: str) -> None:
    """Used to be `500 internal error: OverflowError` from msgpack in the engine client."""
    for body in (_gen(bootstrap_room=2**64), _gen({"top_k": 2**64}), _gen({"seed": 2**70})):
        r = httpx.post(server + "/generate", json=body, timeout=30)
        assert r.status_code == 400, r.text


def test_real_server_extreme_sampling_beside_greedy_requests_all_succeed(server: str) -> None:
    """Four greedy requests plus numerically extreme ones, concurrently: every answer is 200, and the greedy
    outputs equal those of the same requests run alone (as does temperature 1e-50, which is greedy)."""
    prompts = [[(11 * i + j) % VOCAB for j in range(4 + i)] for i in range(4)]

    def post(ids: list[int], sampling: dict[str, Any]) -> httpx.Response:
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, **sampling}}
        return httpx.post(server + "/generate", json=body, timeout=120)

    solo = [post(p, {"temperature": 0}).json()["output_ids"] for p in prompts]
    extreme = [{"temperature": 1e-50}, {"temperature": 1.0, "top_k": 2**63 - 1}, {"temperature": 1e-5, "seed": 3},
               {"temperature": 1e-50, "top_k": 2**63 - 1, "seed": 2**64 - 1}]  # fmt: skip
    with ThreadPoolExecutor(8) as pool:
        greedy = [pool.submit(post, p, {"temperature": 0}) for p in prompts]
        odd = [pool.submit(post, prompts[0], sp) for sp in extreme]
        answers = [f.result() for f in greedy + odd]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
    assert [r.json()["output_ids"] for r in answers[:4]] == solo
    assert answers[4].json()["output_ids"] == solo[0] and answers[7].json()["output_ids"] == solo[0]


def _ids_by_hand(v: Any) -> bool:
    """The oracle of what input_ids may hold: a list of ints (not booleans) in [0, 2**63)."""
    return isinstance(v, list) and all(type(x) is int and 0 <= x < 2**63 for x in v)


SPOILERS = [True, False, -1, -(2**63), 2**63, 2**70, 1.0, 0.5, "1", None, [1], {"a": 1}]


def test_input_ids_are_read_as_exactly_the_lists_of_ids_at_or_above_zero() -> None:
    """token_array (C-built, with booleans looked for only where a 0 or 1 is) against the rule checked id by id, on
    fresh random lists: the same verdict every time, and the array holds the list's ids."""
    rng = random.Random()
    for _ in range(2000):
        v = [rng.choice([0, 1, rng.randrange(2, 2**63)]) for _ in range(rng.randrange(0, 40))]
        if v and rng.random() < 0.6:
            v[rng.randrange(len(v))] = rng.choice(SPOILERS)
        got = token_array(v)
        if _ids_by_hand(v):
            assert got is not None and got.dtype == np.int64 and got.tolist() == v, v
        else:
            assert got is None, v
    assert token_array("12") is None and token_array((1, 2)) is None and token_array(None) is None


def test_input_ids_reach_the_engine_as_sent(app_fake: tuple[TestClient, FakeEngineClient]) -> None:
    """A batch of random prompts: each reaches the engine with its ids, in order; a boolean or an id past 64 bits in
    any prompt answers 400 naming input_ids, and nothing reaches the engine."""
    client, fake = app_fake
    rng = random.Random()
    vocab = fake.model_config["vocab_size"]
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 30))] for _ in range(rng.randint(2, 6))]
    r = client.post("/generate", json={"input_ids": prompts, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 200, r.text
    got = {req.rid: req.input_ids for req in fake.requests[-len(prompts) :]}
    assert [got[out["meta_info"]["id"]].tolist() for out in r.json()] == prompts
    for spoiler in (True, False, 2**64):
        bad = [list(p) for p in prompts]
        bad[-1][rng.randrange(len(bad[-1]))] = spoiler
        before = len(fake.requests)
        r = client.post("/generate", json={"input_ids": bad})
        assert r.status_code == 400 and "input_ids must be a list of token ids" in r.json()["error"]["message"], r.text
        assert len(fake.requests) == before


# JSON values as text, where json and orjson part ways: integers past 64 bits (orjson reads floats), literals json
# alone reads (NaN, Infinity, 1e400), nesting past json's recursion limit, lone surrogates, duplicate keys.
ODD_VALUES = ["18446744073709551616", "-9223372036854775809", "99999999999999999999999", "1e400", "NaN", "-Infinity",
              "1e20", "2.5", "true", "null", '"x"', '"\\ud800"', '"\\ud83d\\ude00"', "[" * 1100 + "]" * 1100,
              "[[1, 2], [3]]", "{}"]  # fmt: skip
FIELDS = ["max_new_tokens", "temperature", "top_k", "seed", "stop_token_ids", "min_new_tokens", "logit_bias", "stop"]
TOP = ["rid", "bootstrap_room", "bootstrap_port", "model", "return_logprob", "stream", "input_ids", "unknown_field"]


def _odd_body(rng: random.Random) -> str:
    """A /generate body as text: random prompts and sampling parameters, now and then an odd value in a random
    field (sampling or top level), a duplicated key or a stray character."""
    prompts = [[rng.randrange(1, 200) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 3))]
    sampling = {"max_new_tokens": str(rng.randint(1, 3)), "temperature": "0.0"}
    top = {"input_ids": json.dumps(prompts if len(prompts) > 1 else prompts[0])}
    for _ in range(rng.choice((0, 1, 1, 2))):
        value = rng.choice(ODD_VALUES)
        if rng.random() < 0.5:
            sampling[rng.choice(FIELDS)] = value
        else:
            top[rng.choice(TOP)] = value
    sampling_text = "{" + ", ".join(f'"{k}": {v}' for k, v in sampling.items()) + "}"
    items = [f'"{k}": {v}' for k, v in top.items()] + [f'"sampling_params": {sampling_text}']
    if rng.random() < 0.1:
        items.append(rng.choice(items))  # a duplicated key
    body = "{" + ", ".join(items) + "}"
    if rng.random() < 0.05:
        body = body[: rng.randrange(len(body))]  # cut short
    return body


def test_generate_bodies_read_by_orjson_answer_as_by_json(app_fake: tuple[TestClient, FakeEngineClient],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """/generate bodies are parsed with orjson where it can (GenerateReqInput.fast_json); on random bodies with the
    values where the two parsers differ, every answer is the one json's parse gives: the same status and error
    message, and the same requests reaching the engine (all but their random ids)."""
    from pd.server.protocol import GenerateReqInput

    client, fake = app_fake
    rng = random.Random()
    seed = rng.randrange(2**31)
    rng.seed(seed)
    ok = 0
    for _ in range(300):
        body = _odd_body(rng)
        answers = []
        for fast in (True, False):
            monkeypatch.setattr(GenerateReqInput, "fast_json", fast)
            before = len(fake.requests)
            r = client.post("/generate", content=body.encode("utf-8", "surrogatepass"))
            sent = [(list(map(int, q.input_ids)), q.sampling) for q in fake.requests[before:]]
            answers.append((r.status_code, r.json()["error"]["message"] if r.status_code != 200 else None, sent))
        assert answers[0] == answers[1], (seed, body[:300], answers)
        ok += answers[0][0] == 200
    assert 30 < ok < 290, (seed, ok)  # both outcomes were exercised
