"""What prefill and decode schedulers share about their instance: transfer settings and the KV memory they
expose (pd/ knows the KV cache layout; the roles themselves live in prefill/ and decode/).

Every rank of an instance caches its share of the KV heads, and the KV moves rank to rank: at start-up a follower
registers its KV memory with a transfer engine (``start_follower_kv``) and hands the endpoint to its leader
(``follower_targets``). A decode leader's registrations then name every rank of its attention group; a prefill
leader hands each follower its share of a room to write (over the step broadcast). No KV moves between the ranks of
an instance.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field

from kvtransfer import get_kv_backend
from kvtransfer.base import KVArgs, KVTargetHolder
from kvtransfer.messages import KVTarget
from pd.dist.leader_link import node0_host
from pd.dist.step_sync import StepSync
from pd.engine.model_runner import ModelRunner
from pd.server_args import ServerArgs


@dataclass(frozen=True)
class DisaggConfig:
    backend: str
    host: str  # address peers reach this instance's transfer endpoints on
    bootstrap_port: int
    bootstrap_timeout: float  # prefill: how long a request waits for its decode peer to register
    transfer_timeout: float  # decode: how long a registered request waits for its KV
    dp_rank: int = 0  # this rank's DP-attention group (each group has its own KV pool and transfer endpoints)
    dp_size: int = 1
    bootstrap_host: str = ""  # prefill: where the instance's bootstrap server runs (node 0); "" = host
    # --api-key: bootstrap routes and KV control messages between instances need it (kept out of repr and logs)
    secret: str | None = field(default=None, repr=False)
    mode: str = "decode"  # --disaggregation-mode: "prefill" or "decode"

    @classmethod
    def from_server_args(cls, args: ServerArgs, dp_rank: int = 0) -> DisaggConfig:
        """The instance's settings (pd.engine.spec.EngineSpec.disagg); each leader sets its own ``dp_rank``."""
        host = args.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())  # a wildcard bind is not an address peers can dial
        # The bootstrap server runs beside the HTTP front on node 0; a DP leader on another node announces
        # itself there (node 0 is --dist-init-addr's host).
        bootstrap_host = host if args.node_rank == 0 else node0_host(args.dist_init_addr or "")
        return cls(args.disaggregation_transfer_backend, host, args.disaggregation_bootstrap_port,
                   args.disaggregation_bootstrap_timeout, args.disaggregation_transfer_timeout, dp_rank,
                   args.attn_dp_size, bootstrap_host, args.api_key, args.disaggregation_mode)


def kv_args(runner: ModelRunner) -> KVArgs:
    """What this rank exposes for transfers: its rank in the attention group, every KV buffer's base address,
    per-token bytes and total bytes (layer-major), the KV heads it caches, and the fingerprint both sides of a
    transfer must share (the model's KV layout, whatever share of the heads each rank holds)."""
    cache = runner.kv_cache
    first, count, total = runner.model.kv_heads()
    ptrs, item_lens, data_lens, layout = [], [], [], []
    for layer in cache.buffers:
        for buf in layer:
            ptrs.append(buf.data_ptr())
            item_lens.append(buf[0].numel() * buf.element_size())
            data_lens.append(buf.numel() * buf.element_size())
        layout.append([[total, buf.shape[2]] for buf in layer])
    fingerprint: dict[str, object] = {
        "architecture": runner.model_config.architecture,
        "num_layers": len(cache.buffers),
        "kv_layout": layout,
        "dtype": str(cache.dtype).removeprefix("torch."),
        "page_size": cache.page_size,
    }
    return KVArgs(runner.tp.rank, ptrs, item_lens, cache.page_size, fingerprint, data_lens, kv_heads=(first, count))


def start_follower_kv(runner: ModelRunner, sync: StepSync, cfg: DisaggConfig) -> KVTargetHolder:
    """A follower's part in its instance's transfers, at the start of its life (pd.engine.rank.follow): it registers
    its KV memory (a decode follower to be written into, a prefill follower to write its heads from) and sends the
    endpoint to its leader (the other half of ``follower_targets``)."""
    backend = get_kv_backend(cfg.backend)
    start = backend.start_decode_target if cfg.mode == "decode" else backend.start_prefill_source
    holder = start(kv_args(runner), cfg)
    sync.gather({"target": asdict(holder.target)})
    return holder


def follower_targets(runner: ModelRunner) -> list[KVTarget]:
    """A leader's followers' endpoints (collective with their start_follower_kv); [] with no followers."""
    if runner.sync is None:
        return []
    got = runner.sync.gather({})
    return [KVTarget(**m["target"]) for m in got if "target" in m]
