"""Dense Llama through our engine equals transformers (the skeleton the MoE models share)."""

from __future__ import annotations

import torch

from pd.engine.io import SamplingParams
from pd.engine.llm import LLM
from tests.tiny_checkpoints import load_hf, make_checkpoint


def test_llama_prefill_logits_and_greedy_match_transformers(tmp_path):
    path = make_checkpoint("llama", str(tmp_path / "llama"), seed=1)
    hf = load_hf(path)
    llm = LLM(path, chunked_prefill_size=32, page_size=4)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 70, 33)]
    for ids in prompts[:2] + prompts[2:3]:
        ours = llm.prefill_logits(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=32, temperature=0.0))
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
        assert out == ref


def test_a_lone_long_prompt_is_prefilled_in_chunks_that_sample_nothing(tmp_path):
    """Middle chunks of a prompt produce no token; their KV must still be written (one request alone, so no
    other request's decode step forces the forward)."""
    path = make_checkpoint("llama", str(tmp_path / "llama"), seed=3)
    hf = load_hf(path)
    ids = torch.randint(0, 256, (4 * 16 + 5,), generator=torch.Generator().manual_seed(4)).tolist()
    for chunk in (16, 7):
        out = LLM(path, chunked_prefill_size=chunk, page_size=16).generate(
            [ids], SamplingParams(max_new_tokens=8, temperature=0.0)
        )
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        assert out[0] == ref, chunk
