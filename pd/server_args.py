"""Server arguments: parsed once from the command line into one frozen dataclass.

"auto" values are resolved when the object is built (so every later reader sees concrete values), and every
bad combination fails then with a `ServerArgsError` that names the flag and says what to change. Features the
flags can name but this build cannot run yet are listed in `_NOT_IMPLEMENTED`; `from_namespace` refuses them,
so they are never silently ignored. Per-rank or per-test copies are made with `dataclasses.replace`, which
re-runs the same validation; note that values already resolved from others (served_model_name and
tokenizer_path from model_path, dtype/mem_fraction_static/max_total_tokens from device) are kept as they are,
so pass them too when replacing the field they came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtransfer import kv_backend_names

if TYPE_CHECKING:
    import torch

A2A_BACKENDS = ("none", "torch", "deepep", "mooncake", "mori", "flashinfer", "ascend_fuseep")
MOE_RUNNER_BACKENDS = ("auto", "torch", "cpu_packed", "triton", "deep_gemm", "flashinfer_cutlass", "cutlass")
DEEPEP_MODES = ("auto", "normal", "low_latency")
# Ours, then SGLang's other names: accepted by the parser so a copied command line gets a clear start-up message.
ATTENTION_BACKENDS = ("auto", "torch", "triton", "fa3", "fa4", "flashinfer", "flashmla", "cutlass_mla", "trtllm_mla",
                      "trtllm_mha", "aiter", "wave", "ascend", "torch_native", "flex_attention",
                      "dual_chunk_flash_attn", "intel_amx")  # fmt: skip
DISAGGREGATION_MODES = ("null", "prefill", "decode")
TRANSFER_BACKENDS = tuple(kv_backend_names())  # what the registry provides, so a typo fails at parse time
DEVICES = ("auto", "cpu", "cuda", "npu")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "fp8")  # pd.models.fp8_loading.QUANTIZATIONS
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")  # pd.engine.kv_cache.KV_STORAGE_DTYPES
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# The API key when neither --api-key nor --api-key-file is given; `pd up` hands the key to its children this way.
API_KEY_ENV = "PD_API_KEY"

DEFAULT_SERVED_MODEL_NAME = "pd-default"
DEFAULT_CPU_MAX_TOTAL_TOKENS = 65536
DEFAULT_GPU_MEM_FRACTION = 0.85
DEFAULT_CUDA_GRAPH_MAX_BS = 256
DEFAULT_PIECEWISE_MAX_TOKENS = 4096  # the largest piecewise graph when prompts are not chunked
DEFAULT_CHUNKED_PREFILL_SIZE = 2048  # off CUDA, and on GPUs under 35 GiB

# Backends whose kernels exist for one device kind only (Triton's CPU interpreter, TRITON_INTERPRET=1, runs the
# triton ones anywhere: slowly, for tests).
_ATTENTION_DEVICE = {"triton": "cuda"}
_A2A_DEVICE = {"deepep": "cuda", "mooncake": "cuda", "mori": "cuda", "flashinfer": "cuda", "ascend_fuseep": "npu"}
_RUNNER_DEVICE = {
    "cpu_packed": "cpu", "triton": "cuda", "deep_gemm": "cuda", "flashinfer_cutlass": "cuda", "cutlass": "cuda"
}
# These dispatchers address every rank's experts directly, so the EP group must be the whole TP group.
_A2A_NEEDS_EP_EQ_TP = ("deepep", "mooncake", "mori", "ascend_fuseep")


class ServerArgsError(ValueError):
    """A bad flag or flag combination; the message names the flag and says what to change."""


def _opt(default: Any, help: str, *flags: str, choices: Sequence[str] | None = None, type: Any = None,
         nargs: str | None = None) -> Any:  # fmt: skip
    """A dataclass field that also describes its command-line flag (bool defaults become store_true)."""
    meta = {"flags": flags, "help": help, "choices": choices, "type": type, "nargs": nargs}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerArgs:
    """Everything one server instance is started with. Build with `from_cli`/`from_namespace` or directly."""

    # Model
    model_path: str | None = _opt(
        None, "checkpoint dir or HF id; default: the built-in tiny MoE", "--model-path", "--model", type=str
    )
    tokenizer_path: str | None = _opt(None, "default: --model-path", type=str)
    served_model_name: str | None = _opt(None, "name in the API; default: basename of --model-path", type=str)
    context_length: int | None = _opt(None, "max tokens per request; default: from the model config", type=int)
    trust_remote_code: bool = _opt(False, "accepted for compatibility and ignored")
    skip_tokenizer_init: bool = _opt(False, "take and return token ids only")
    # Parallelism
    tp_size: int = _opt(1, "tensor-parallel size (ranks per instance)", "--tp-size", "--tp", type=int)
    ep_size: int = _opt(1, "expert-parallel size; must divide --tp-size", "--ep-size", "--ep", type=int)
    dp_size: int = _opt(1, "data-parallel attention groups; needs --enable-dp-attention", type=int)
    enable_dp_attention: bool = _opt(False, "data-parallel attention inside the TP group")
    pp_size: int = _opt(1, "pipeline-parallel size", type=int)
    nnodes: int = _opt(1, "number of nodes of this instance", type=int)
    node_rank: int = _opt(0, "rank of this node, 0..nnodes-1", type=int)
    dist_init_addr: str | None = _opt(None, "host:port of node 0 for multi-node init", type=str)
    attention_backend: str = _opt("auto", "attention kernels (auto: triton on cuda, torch elsewhere)",
                                  choices=ATTENTION_BACKENDS)  # fmt: skip
    # MoE
    moe_a2a_backend: str = _opt("none", "token dispatcher ('torch': portable all-to-all)", choices=A2A_BACKENDS)
    moe_runner_backend: str = _opt("auto", "grouped-GEMM runner (auto: triton on cuda, cpu_packed on cpu)",
                                   choices=MOE_RUNNER_BACKENDS)  # fmt: skip
    deepep_mode: str = _opt("auto", "dispatch mode; auto: per batch, or by --disaggregation-mode", choices=DEEPEP_MODES)
    enable_two_batch_overlap: bool = _opt(False, "overlap two micro-batches' attention and dispatch")
    enable_single_batch_overlap: bool = _opt(False, "overlap shared experts with dispatch")
    enable_eplb: bool = _opt(False, "rebalance expert placement from recorded load")
    ep_num_redundant_experts: int = _opt(0, "extra expert replicas for EPLB", type=int)
    eplb_rebalance_num_iterations: int = _opt(1000, "forward passes between EPLB rebalances", type=int)
    eplb_rebalance_layers_per_chunk: int | None = _opt(
        None, "move the experts of this many MoE layers per forward (default: all at once)", type=int
    )
    eplb_min_rebalancing_utilization_threshold: float = _opt(
        1.0, "rebalance only when the measured balancedness (mean/max GPU load) is at most this", type=float
    )
    init_expert_location: str | None = _opt(
        None, "start-up expert placement: a JSON/.pt file with logical_count or physical_to_logical_map"
    )
    expert_distribution_dir: str | None = _opt(None, "with --enable-eplb: write each rebalance's expert load here")
    speculative_moe_runner_backend: str | None = _opt(None, "runner for draft models", choices=MOE_RUNNER_BACKENDS)
    # Disaggregation
    disaggregation_mode: str = _opt("null", "run as a prefill or decode instance", choices=DISAGGREGATION_MODES)
    disaggregation_transfer_backend: str = _opt("mooncake", "KV transfer backend", choices=TRANSFER_BACKENDS)
    disaggregation_bootstrap_port: int = _opt(8998, "prefill bootstrap server port", type=int)
    disaggregation_bootstrap_timeout: float = _opt(
        30.0, "prefill: seconds a request waits for its decode peer to register", type=float
    )
    disaggregation_transfer_timeout: float = _opt(
        60.0, "decode: seconds a request waits for its KV from prefill", type=float
    )
    disaggregation_decode_enable_radix_cache: bool = _opt(
        False, "decode: keep finished requests' KV in a prefix cache and reuse it; prefill then sends only the "
        "pages after the prefix decode holds (ignored by other modes)"
    )
    # Memory and scheduling
    mem_fraction_static: float | None = _opt(None, "GPU memory fraction for weights + KV; auto 0.85", type=float)
    max_running_requests: int = _opt(64, "max requests in one running batch", type=int)
    max_total_tokens: int | None = _opt(None, "KV capacity in tokens; auto: 65536 on CPU, from memory on GPU", type=int)
    max_queued_requests: int = _opt(1024, "requests waiting beyond this are rejected", type=int)
    chunked_prefill_size: int | None = _opt(
        None, "max prompt tokens per prefill step; -1 disables chunking; auto (SGLang's): by the GPU's memory, 2048 "
        "under 35 GiB, 8192 under 160 GiB (H100, H200), else 16384; 2048 off CUDA", type=int)
    max_prefill_tokens: int = _opt(
        16384, "max prompt tokens in one prefill step (SGLang's); the bound is never below the context length, so "
        "with chunked prefill on it rarely binds", type=int)
    prefill_wait_ms: float = _opt(
        0.0, "an idle instance that receives a request waits up to this long for more of its burst before the first "
        "prefill forward, while they keep coming (each within 2 ms of the last) and the forward has room: a burst "
        "then runs as full forwards, not a small first one and the rest (an MoE forward reads every expert's weights "
        "whatever its size). 0 (default): the first request runs at once, as SGLang's scheduler does", type=float)
    page_size: int = _opt(16, "tokens per KV page", type=int)
    decode_log_interval: int = _opt(40, "steps between two progress lines in the log (0: none)", type=int)
    stream_interval: int = _opt(
        1, "a streaming request's tokens are sent every this many (the first at once); larger spares the front and "
        "the balancer a wake-up per token at large batches; a request's sampling_params.stream_interval overrides it",
        type=int,
    )
    disable_radix_cache: bool = _opt(
        False, "compute every prompt in full instead of reusing the KV of cached prefixes (prefix cache off)"
    )
    disable_overlap_schedule: bool = _opt(
        False, "run each step's host work (batch building, output processing) after its forward instead of beside it"
    )
    cuda_graph_max_bs: int | None = _opt(
        None, f"largest decode batch replayed from a CUDA graph; default: --max-running-requests, at most "
        f"{DEFAULT_CUDA_GRAPH_MAX_BS}", type=int)  # fmt: skip
    cuda_graph_bs: tuple[int, ...] | None = _opt(
        None, "decode batch sizes captured as CUDA graphs; default: 1 2 4 8, then every 8 up to --cuda-graph-max-bs",
        type=int, nargs="+")  # fmt: skip
    disable_cuda_graph: bool = _opt(False, "run decode batches eagerly (no CUDA graphs)")
    piecewise_cuda_graph_max_tokens: int | None = _opt(
        None, f"largest prompt forward (tokens) replayed from piecewise CUDA graphs; default: --chunked-prefill-size "
        f"({DEFAULT_PIECEWISE_MAX_TOKENS} when chunking is off)", type=int)  # fmt: skip
    piecewise_cuda_graph_tokens: tuple[int, ...] | None = _opt(
        None, "prompt forward token counts captured as piecewise CUDA graphs; default: every 64 up to 1024, then "
        "every 128 up to 2048, every 256 up to 4096, and so on, up to --piecewise-cuda-graph-max-tokens",
        type=int, nargs="+")  # fmt: skip
    disable_piecewise_cuda_graph: bool = _opt(
        False, "run prompt (prefill) forwards eagerly, without piecewise CUDA graphs (the layers between attention "
        "calls replayed from graphs, attention run eagerly)")  # fmt: skip
    # Runtime
    device: str = _opt("auto", "auto: cuda if available, else npu if torch_npu imports, else cpu", choices=DEVICES)
    dtype: str = _opt("auto", "auto: float32 on cpu, bfloat16 on cuda/npu", choices=DTYPES)
    quantization: str = _opt("none", "fp8: quantize an unquantized checkpoint's weights block-wise at load (an FP8 "
                             "checkpoint loads as FP8 either way)", choices=QUANTIZATIONS)  # fmt: skip
    kv_cache_dtype: str = _opt("auto", "KV cache storage: auto (the model's dtype), or fp8_e4m3/fp8_e5m2 (one byte per "
                               "value, twice the tokens in the same memory; K and V rounded to FP8 with scale 1.0, "
                               "as SGLang does without calibrated scales)", choices=KV_CACHE_DTYPES)  # fmt: skip
    random_seed: int = _opt(0, "seed for sampling and weight init", type=int)
    sampling_defaults: str = _opt("model", "defaults of unset sampling parameters: model (the model's "
                                  "generation_config.json) or openai (temperature 1, top_p 1)",
                                  choices=("model", "openai"))  # fmt: skip
    # HTTP
    host: str = _opt("127.0.0.1", "listen address", type=str)
    port: int = _opt(30000, "HTTP port", type=int)
    tokenizer_worker_num: int = _opt(
        1, "HTTP front processes sharing --port (SGLang's flag): each serves the connections the kernel hands it, with "
        "its own tokenizer, detokenizer and pipes to the engine; more than one lifts the front's one-core bound on "
        "streamed tokens per second at large batches", type=int)  # fmt: skip
    api_key: str | None = _opt(None, f"require 'Authorization: Bearer <key>' (or set {API_KEY_ENV})", type=str)
    api_key_file: str | None = _opt(None, "read --api-key from this file, keeping it out of `ps`", type=str)
    log_level: str = _opt("info", "logging level", choices=LOG_LEVELS)
    enable_metrics: bool = _opt(False, "accepted for compatibility; /metrics is always on")

    def __post_init__(self) -> None:
        # Frozen, so resolved values are written through object.__setattr__; resolution is idempotent, which
        # keeps dataclasses.replace (which calls __init__ again) consistent.
        for name, value in _resolve_auto(self).items():
            object.__setattr__(self, name, value)
        _validate(self)

    # ---- construction from the command line ----
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per field to `parser` (dest = field name)."""
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flags = meta["flags"] or (_flag(f.name),)
            if isinstance(f.default, bool):
                parser.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"])
            else:
                parser.add_argument(
                    *flags,
                    dest=f.name,
                    default=f.default,
                    type=meta["type"],
                    choices=meta["choices"],
                    nargs=meta["nargs"],
                    help=meta["help"] if f.default is None else f"{meta['help']} (default: {f.default})",
                )

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ServerArgs:
        """Build from parsed flags (extra attributes are ignored). Raises ServerArgsError on a bad or
        not-yet-implemented combination."""
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {n: getattr(ns, n) for n in names if hasattr(ns, n)}
        kwargs["api_key"] = resolve_api_key(kwargs.get("api_key"), kwargs.get("api_key_file"))
        args = cls(**kwargs)
        check_implemented(args)
        return args

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, prog: str = "pd serve") -> ServerArgs:
        """Parse `argv` (default: sys.argv[1:]); errors exit with status 2 and an argparse-style message."""
        parser = argparse.ArgumentParser(prog=prog, usage="%(prog)s [options]", allow_abbrev=False)
        cls.add_cli_args(parser)
        ns = parser.parse_args(argv)
        try:
            return cls.from_namespace(ns)
        except ServerArgsError as e:
            parser.error(str(e))

    # ---- derived values ----
    @property
    def is_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def is_npu(self) -> bool:
        return self.device == "npu"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]

    @property
    def dist_backend(self) -> str:
        """torch.distributed backend for this device kind."""
        return {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[self.device]

    @property
    def uses_default_model(self) -> bool:
        return self.model_path is None

    @property
    def world_size(self) -> int:
        """Ranks in this instance, over all its nodes."""
        return self.tp_size * self.pp_size

    @property
    def attn_dp_size(self) -> int:
        """Attention groups: dp_size under DP attention, else one."""
        return self.dp_size if self.enable_dp_attention else 1

    @property
    def attn_tp_size(self) -> int:
        """TP size of attention: the TP group is split into dp_size attention groups under DP attention."""
        return self.tp_size // self.attn_dp_size

    @property
    def moe_tp_size(self) -> int:
        """How many ranks split each expert's weights (the EP<TP hybrid)."""
        return self.tp_size // self.ep_size

    @property
    def is_disaggregated(self) -> bool:
        return self.disaggregation_mode != "null"

    @property
    def chunked_prefill_enabled(self) -> bool:
        return self.chunked_prefill_size != -1

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def to_json_dict(self) -> dict[str, Any]:
        """All fields as JSON-able values for /get_server_info; the API key is never echoed back."""
        d = dataclasses.asdict(self)
        d["api_key"] = None if self.api_key is None else "<set>"
        return d


def resolve_api_key(api_key: str | None, api_key_file: str | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The API key from --api-key, else from --api-key-file (surrounding whitespace stripped), else from the
    PD_API_KEY environment variable; None when none is set. Raises ServerArgsError for both flags at once, or a
    file that cannot be read or is empty. The one place that reads PD_API_KEY (`pd serve` and `pd lb`)."""
    if api_key is not None and api_key_file is not None:
        raise ServerArgsError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            with open(api_key_file) as f:
                key = f.read().strip()
        except OSError as e:
            raise ServerArgsError(f"--api-key-file {api_key_file}: cannot read it ({e.strerror})") from None
        if not key:
            raise ServerArgsError(f"--api-key-file {api_key_file} is empty; write the key into it")
        return key
    return api_key if api_key is not None else env.get(API_KEY_ENV) or None


def _flag(name: str) -> str:
    """The canonical flag of a field, as used in error messages."""
    for f in dataclasses.fields(ServerArgs):
        if f.name == name and f.metadata["flags"]:
            return f.metadata["flags"][0]
    return "--" + name.replace("_", "-")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    try:
        import torch
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:  # a broken install counts as absent; --device npu then says so
        return False
    return bool(torch.npu.is_available())


def resolve_moe_runner(name: str, device: str) -> str:
    """The MoE runner that ``--moe-runner-backend name`` means on ``device`` ("auto" -> a concrete name)."""
    if name != "auto":
        return name
    # On CPU, oneDNN-packed expert weights run decode-sized GEMMs several times faster than grouped_mm; on CUDA
    # the Triton fused-MoE kernels run without a host sync (CUDA graphs) and read each hit expert once.
    return {"cpu": "cpu_packed", "cuda": "triton"}.get(device, "torch")


def resolve_attention_backend(name: str, device: str) -> str:
    """The attention backend that ``--attention-backend name`` means on ``device`` ("auto" -> a concrete name)."""
    if name != "auto":
        return name
    return "triton" if device == "cuda" else "torch"


def default_cuda_graph_bs(max_bs: int) -> tuple[int, ...]:
    """SGLang's bucket spacing: 1, 2, 4, 8, then every 8 up to max_bs (max_bs itself always included)."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_bs} | set(range(16, max_bs + 1, 8)) | {max_bs}
    return tuple(sorted(sizes))


def default_piecewise_tokens(max_tokens: int) -> tuple[int, ...]:
    """Prompt forward sizes: every 64 up to 1024, then every 1/8 of each power of two (128 up to 2048, 256 up to
    4096, ...), and max_tokens itself. A forward pads to the next size: under 64 tokens, or 12.5% past 512."""
    sizes, step, high = {max_tokens}, 64, 1024
    size = step
    while size < max_tokens:
        sizes.add(size)
        if size >= high:
            step, high = high // 8, high * 2
        size += step
    return tuple(sorted(sizes))


def default_chunked_prefill_size(gpu_memory_bytes: int | None) -> int:
    """SGLang's default prompt tokens per prefill step, by the GPU's memory (None: not a CUDA device). Larger steps
    matter for MoE prefill: a step's experts read every expert's weights once, so 2048-token steps over 256 experts
    are bound by that read, not by the GEMMs."""
    if gpu_memory_bytes is None or gpu_memory_bytes < 35 * 2**30:
        return DEFAULT_CHUNKED_PREFILL_SIZE
    return 8192 if gpu_memory_bytes < 160 * 2**30 else 16384


def gpu_memory_bytes(device: str) -> int | None:
    """The memory of the CUDA GPU ``device`` names ("cuda": the current one), None for any other device."""
    import torch

    if str(device).split(":")[0] != "cuda" or not torch.cuda.is_available():  # "npu" parses only with torch_npu loaded
        return None
    dev = torch.device(device)
    return int(torch.cuda.get_device_properties(dev if dev.index is not None else torch.cuda.current_device())
               .total_memory)  # fmt: skip


def resolve_chunked_prefill_size(a: ServerArgs, device: str) -> int:
    """--chunked-prefill-size, or its default on this device, never above --max-total-tokens when that is given."""
    if a.chunked_prefill_size is not None:
        return a.chunked_prefill_size
    size = default_chunked_prefill_size(gpu_memory_bytes(device))
    return size if a.max_total_tokens is None else max(1, min(size, a.max_total_tokens))


def default_piecewise_max_tokens(chunked_prefill_size: int) -> int:
    """The largest prompt forward: the chunked-prefill budget (a step's most tokens), else a fixed size."""
    return chunked_prefill_size if chunked_prefill_size > 0 else DEFAULT_PIECEWISE_MAX_TOKENS


def resolve_piecewise_tokens(a: ServerArgs, device: str, chunked_prefill_size: int) -> tuple[int, ...]:
    """The prompt forward sizes to capture as piecewise graphs: () when they are off
    (--disable-piecewise-cuda-graph, or not on CUDA)."""
    if a.piecewise_cuda_graph_tokens and min(a.piecewise_cuda_graph_tokens) < 1:  # checked before they are dropped
        raise ServerArgsError(f"--piecewise-cuda-graph-tokens sizes must be >= 1, got {a.piecewise_cuda_graph_tokens}")
    if a.disable_piecewise_cuda_graph or device != "cuda":
        return ()
    if a.piecewise_cuda_graph_tokens is not None:
        return tuple(sorted(set(a.piecewise_cuda_graph_tokens)))
    max_tokens = a.piecewise_cuda_graph_max_tokens
    if max_tokens is None:
        max_tokens = default_piecewise_max_tokens(chunked_prefill_size)
    return default_piecewise_tokens(max_tokens)


def resolve_cuda_graph_bs(a: ServerArgs, device: str) -> tuple[int, ...]:
    """The decode batch sizes to capture: () when graphs are off (--disable-cuda-graph, or not on CUDA)."""
    if a.disable_cuda_graph or device != "cuda":
        return ()
    if a.cuda_graph_bs is not None:
        return tuple(sorted(set(a.cuda_graph_bs)))
    max_bs = a.cuda_graph_max_bs or min(a.max_running_requests, DEFAULT_CUDA_GRAPH_MAX_BS)
    return default_cuda_graph_bs(max_bs)


def _resolve_auto(a: ServerArgs) -> dict[str, Any]:
    """Concrete values for every 'auto'/None field that has a parse-time answer."""
    device = a.device
    if device == "auto":
        device = "cuda" if _cuda_available() else "npu" if _npu_available() else "cpu"
    elif device == "cuda" and not _cuda_available():
        raise ServerArgsError(
            "--device cuda was requested but torch.cuda.is_available() is False; "
            "install a CUDA build of torch or pass --device cpu"
        )
    elif device == "npu" and not _npu_available():
        raise ServerArgsError(
            "--device npu was requested but torch_npu does not import or sees no NPU; "
            "install torch_npu or pass --device cpu"
        )
    deepep_mode = a.deepep_mode
    if deepep_mode == "auto" and a.disaggregation_mode != "null":
        # Prefill batches are large and variable (normal); decode batches are small and graph-captured.
        deepep_mode = "normal" if a.disaggregation_mode == "prefill" else "low_latency"
    name = a.served_model_name
    if name is None:
        name = os.path.basename(a.model_path.rstrip("/")) if a.model_path else DEFAULT_SERVED_MODEL_NAME
    on_cpu = device == "cpu"
    chunked_prefill_size = resolve_chunked_prefill_size(a, device)
    return {
        "device": device,
        "chunked_prefill_size": chunked_prefill_size,
        "dtype": ("float32" if on_cpu else "bfloat16") if a.dtype == "auto" else a.dtype,
        "moe_runner_backend": resolve_moe_runner(a.moe_runner_backend, device),
        "attention_backend": resolve_attention_backend(a.attention_backend, device),
        "cuda_graph_bs": resolve_cuda_graph_bs(a, device),
        "piecewise_cuda_graph_tokens": resolve_piecewise_tokens(a, device, chunked_prefill_size),
        "deepep_mode": deepep_mode,
        "served_model_name": name,
        "tokenizer_path": a.model_path if a.tokenizer_path is None else a.tokenizer_path,
        "mem_fraction_static": DEFAULT_GPU_MEM_FRACTION
        if a.mem_fraction_static is None and not on_cpu
        else a.mem_fraction_static,
        # On GPU the model runner derives capacity from free memory after loading weights.
        "max_total_tokens": DEFAULT_CPU_MAX_TOTAL_TOKENS
        if a.max_total_tokens is None and on_cpu
        else a.max_total_tokens,
        # SGLang's name for the start-up placement without a file
        "init_expert_location": None if a.init_expert_location == "trivial" else a.init_expert_location,
    }


def _validate(a: ServerArgs) -> None:
    """Raise ServerArgsError for the first bad combination, in the order a user would fix them."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ServerArgsError(msg)

    for name in ("disaggregation_bootstrap_timeout", "disaggregation_transfer_timeout"):
        need(getattr(a, name) > 0, f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(a, name)}")
    need(not (a.disaggregation_decode_enable_radix_cache and a.disable_radix_cache),
         "--disaggregation-decode-enable-radix-cache turns on the prefix cache that --disable-radix-cache turns off; "
         "drop one of them")

    for n in (
        "tp_size",
        "ep_size",
        "dp_size",
        "pp_size",
        "nnodes",
        "page_size",
        "max_running_requests",
        "max_queued_requests",
        "eplb_rebalance_num_iterations",
        "stream_interval",
        "tokenizer_worker_num",
    ):
        need(getattr(a, n) >= 1, f"{_flag(n)} must be >= 1, got {getattr(a, n)}")
    need(a.tokenizer_worker_num == 1 or a.nnodes == 1,
         "--tokenizer-worker-num > 1 needs a one-node instance (other nodes' DP leaders link to one front process)")
    need(a.ep_num_redundant_experts >= 0, f"--ep-num-redundant-experts must be >= 0, got {a.ep_num_redundant_experts}")
    need(
        a.eplb_rebalance_layers_per_chunk is None or a.eplb_rebalance_layers_per_chunk >= 1,
        f"--eplb-rebalance-layers-per-chunk must be >= 1, got {a.eplb_rebalance_layers_per_chunk}",
    )
    need(a.context_length is None or a.context_length >= 1, f"--context-length must be >= 1, got {a.context_length}")
    need(
        a.max_total_tokens is None or a.max_total_tokens >= a.page_size,
        f"--max-total-tokens ({a.max_total_tokens}) must be >= --page-size ({a.page_size})",
    )
    need(0 <= a.node_rank < a.nnodes, f"--node-rank ({a.node_rank}) must be in 0..{a.nnodes - 1} (--nnodes {a.nnodes})")
    need(a.nnodes == 1 or a.dist_init_addr is not None, "--nnodes > 1 requires --dist-init-addr host:port of node 0")
    if a.dist_init_addr is not None:
        host, _, port = a.dist_init_addr.rpartition(":")
        need(
            bool(host) and port.isdigit() and 1 <= int(port) <= 65535,
            f"--dist-init-addr must be host:port with a port in 1..65535, got {a.dist_init_addr!r}",
        )
    need(
        a.world_size % a.nnodes == 0,
        f"--nnodes ({a.nnodes}) must divide the rank count --tp-size x --pp-size ({a.world_size})",
    )
    # Expert parallelism.
    need(a.tp_size % a.ep_size == 0, f"--ep-size ({a.ep_size}) must divide --tp-size ({a.tp_size})")
    need(
        a.moe_a2a_backend not in _A2A_NEEDS_EP_EQ_TP or a.ep_size == a.tp_size,
        f"--moe-a2a-backend {a.moe_a2a_backend} needs --ep-size == --tp-size (got {a.ep_size} and {a.tp_size})",
    )
    need(
        a.ep_size == a.tp_size or a.moe_a2a_backend == "none",
        f"--ep-size ({a.ep_size}) < --tp-size ({a.tp_size}) requires --moe-a2a-backend none, got {a.moe_a2a_backend}",
    )
    need(a.dp_size == 1 or a.enable_dp_attention, f"--dp-size {a.dp_size} requires --enable-dp-attention")
    need(a.tp_size % a.dp_size == 0, f"--dp-size ({a.dp_size}) must divide --tp-size ({a.tp_size})")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for flag, backend, table in (
        ("--attention-backend", a.attention_backend, _ATTENTION_DEVICE),
        ("--moe-a2a-backend", a.moe_a2a_backend, _A2A_DEVICE),
        ("--moe-runner-backend", a.moe_runner_backend, _RUNNER_DEVICE),
        ("--speculative-moe-runner-backend", a.speculative_moe_runner_backend, _RUNNER_DEVICE),
    ):
        want = None if backend == "triton" and interpreted else table.get(backend or "")
        hint = " (on a CPU Triton kernels run only in Triton's interpreter, for tests: TRITON_INTERPRET=1)"
        need(want is None or a.device == want,
             f"{flag} {backend} requires --device {want}, got {a.device}{hint if backend == 'triton' else ''}")
    need(
        not a.enable_two_batch_overlap or a.moe_a2a_backend != "none",
        "--enable-two-batch-overlap overlaps dispatch with compute, so it needs --moe-a2a-backend other than none",
    )
    need(not a.enable_eplb or a.ep_size > 1, "--enable-eplb requires --ep-size > 1")
    need(a.init_expert_location is None or a.ep_size > 1, "--init-expert-location requires --ep-size > 1")
    need(
        a.init_expert_location is None or os.path.isfile(a.init_expert_location),
        f"--init-expert-location {a.init_expert_location}: no such file",
    )
    need(
        0.0 <= a.eplb_min_rebalancing_utilization_threshold <= 1.0,
        "--eplb-min-rebalancing-utilization-threshold must be in [0, 1], got "
        f"{a.eplb_min_rebalancing_utilization_threshold}",
    )
    need(a.expert_distribution_dir is None or a.enable_eplb,
         "--expert-distribution-dir records the load EPLB rebalances use, so it needs --enable-eplb")
    need(a.ep_num_redundant_experts == 0 or a.ep_size > 1, "--ep-num-redundant-experts > 0 requires --ep-size > 1")
    # Disaggregation: prefill batches always dispatch in normal mode, decode batches in low_latency mode.
    bad_mode = {"prefill": "low_latency", "decode": "normal"}.get(a.disaggregation_mode)
    need(
        a.deepep_mode != bad_mode,
        f"--deepep-mode {a.deepep_mode} cannot be used with --disaggregation-mode {a.disaggregation_mode}; "
        "drop --deepep-mode (auto picks the right one)",
    )
    need(
        a.deepep_mode != "low_latency" or a.disaggregation_mode != "null" or a.moe_a2a_backend == "none",
        "--deepep-mode low_latency cannot run prefill batches (its buffers hold a decode batch); "
        "use --deepep-mode auto, which dispatches prefill batches in normal mode",
    )
    # Memory and scheduling.
    need(a.cuda_graph_max_bs is None or a.cuda_graph_max_bs >= 1,
         f"--cuda-graph-max-bs must be >= 1, got {a.cuda_graph_max_bs}")
    need(not a.cuda_graph_bs or min(a.cuda_graph_bs) >= 1, f"--cuda-graph-bs sizes must be >= 1, got {a.cuda_graph_bs}")
    need(a.piecewise_cuda_graph_max_tokens is None or a.piecewise_cuda_graph_max_tokens >= 1,
         f"--piecewise-cuda-graph-max-tokens must be >= 1, got {a.piecewise_cuda_graph_max_tokens}")
    need(a.max_prefill_tokens >= 1, f"--max-prefill-tokens must be >= 1, got {a.max_prefill_tokens}")
    need(0 <= a.prefill_wait_ms <= 1000, f"--prefill-wait-ms must be in [0, 1000], got {a.prefill_wait_ms}")
    need(
        a.chunked_prefill_size == -1 or a.chunked_prefill_size >= a.page_size,
        f"--chunked-prefill-size ({a.chunked_prefill_size}) must be -1 (off) or >= --page-size ({a.page_size})",
    )
    need(
        a.max_total_tokens is None or a.chunked_prefill_size <= a.max_total_tokens,
        f"--chunked-prefill-size ({a.chunked_prefill_size}) must be <= --max-total-tokens ({a.max_total_tokens})",
    )
    need(
        a.mem_fraction_static is None or 0.0 < a.mem_fraction_static < 1.0,
        f"--mem-fraction-static must be in (0, 1), got {a.mem_fraction_static}",
    )
    # Network.
    need(bool(a.host), "--host must not be empty")
    for n in ("port", "disaggregation_bootstrap_port"):
        need(1 <= getattr(a, n) <= 65535, f"{_flag(n)} must be in 1..65535, got {getattr(a, n)}")
    need(
        a.disaggregation_mode != "prefill" or a.disaggregation_bootstrap_port != a.port,
        f"--disaggregation-bootstrap-port ({a.disaggregation_bootstrap_port}) must differ from --port",
    )


# What this build cannot run yet: (message with {a.<field>} placeholders, predicate). Remove a row when the
# feature lands; nothing else needs to change.
_NOT_IMPLEMENTED: tuple[tuple[str, Callable[[ServerArgs], bool]], ...] = (
    ("--pp-size {a.pp_size}", lambda a: a.pp_size > 1),
    ("--attention-backend {a.attention_backend} (available: torch, triton)",
     lambda a: a.attention_backend not in ("torch", "triton")),
    ("--moe-a2a-backend {a.moe_a2a_backend}", lambda a: a.moe_a2a_backend not in ("none", "torch", "deepep")),
    ("--moe-runner-backend {a.moe_runner_backend}",
     lambda a: a.moe_runner_backend not in ("torch", "cpu_packed", "triton", "deep_gemm")),
    ("--speculative-moe-runner-backend", lambda a: a.speculative_moe_runner_backend is not None),
    ("--device npu", lambda a: a.device == "npu"),
)


def not_implemented(args: ServerArgs) -> list[str]:
    """One message per requested feature this build cannot run yet (empty if all are supported)."""
    return [
        f"{label.format(a=args)} is not implemented yet in this build" for label, pred in _NOT_IMPLEMENTED if pred(args)
    ]


def check_implemented(args: ServerArgs) -> None:
    """Raise ServerArgsError listing every requested feature that is not implemented yet."""
    missing = not_implemented(args)
    if missing:
        raise ServerArgsError("; ".join(missing))
