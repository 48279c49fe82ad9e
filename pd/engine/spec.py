"""The engine spec of one instance: every setting its ranks need, derived once from ServerArgs.

The spec is plain data (frozen dataclasses and a picklable scheduler factory): the front, or `pd serve
--node-rank N`, builds it and hands it to each rank process it spawns, which fills in its own coordinates with
``dataclasses.replace`` (its device, its expert block and groups, its DP-attention group's transfer endpoints).
No rank reads ServerArgs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pd.dist.topology import InstanceLayout
from pd.engine.disagg import DisaggConfig
from pd.engine.model_runner import ModelRunner, RunnerConfig
from pd.engine.scheduler import Scheduler, SchedulerConfig
from pd.moe.context import EplbConfig, MoeContext
from pd.moe.long_seq import long_seq_config_from_env
from pd.server_args import ServerArgs

# Builds a leader's scheduler from the instance's scheduler settings, the leader's loaded runner and its transfer
# settings (None in a unified instance). Prefill and decode instances pass their scheduler classes, whose
# constructors take these arguments (pd/ cannot import them).
SchedulerFactory = Callable[[SchedulerConfig, ModelRunner, DisaggConfig | None], Scheduler]


def default_scheduler(cfg: SchedulerConfig, runner: ModelRunner, disagg: DisaggConfig | None = None) -> Scheduler:
    """A unified instance's scheduler: prefill and decode in one batch."""
    return Scheduler(cfg, runner)


@dataclass(frozen=True)
class EngineSpec:
    """What every rank of an instance runs with.

    Attributes:
        layout: the ranks, their nodes and how they meet.
        runner: the model runner's settings (``device`` is the device kind; a CUDA rank picks its index).
        scheduler: the leaders' scheduler settings.
        moe: the instance's MoE settings; each rank adds its expert block and groups (pd.engine.rank.moe_context).
        disagg: KV transfer settings of a prefill or decode instance, None when unified; each leader sets its
            DP-attention group (``dp_rank``).
        make_scheduler: builds a leader's scheduler (see SchedulerFactory).
        log_level: the rank processes' logging level.
    """

    layout: InstanceLayout
    runner: RunnerConfig
    scheduler: SchedulerConfig
    moe: MoeContext
    disagg: DisaggConfig | None = None
    make_scheduler: SchedulerFactory = default_scheduler
    log_level: str = "info"

    @classmethod
    def from_server_args(cls, args: ServerArgs, make_scheduler: SchedulerFactory = default_scheduler) -> EngineSpec:
        """The spec of the instance ``args`` describes. ``args.model_path`` must be set (the default model
        resolved). Raises ValueError when the DEEPEP_NORMAL_LONG_SEQ_* variables are inconsistent."""
        assert args.model_path is not None, "resolve the default model first (pd.default_model.with_default_model)"
        return cls(
            layout=instance_layout(args),
            runner=runner_config(args, args.model_path),
            scheduler=scheduler_config(args),
            moe=moe_settings(args),
            disagg=DisaggConfig.from_server_args(args) if args.is_disaggregated else None,
            make_scheduler=make_scheduler,
            log_level=args.log_level,
        )


def instance_layout(args: ServerArgs) -> InstanceLayout:
    return InstanceLayout(args.tp_size, args.attn_dp_size, args.ep_size, args.nnodes, args.node_rank,
                          args.dist_backend, args.dist_init_addr or "")  # fmt: skip


def runner_config(args: ServerArgs, model_path: str) -> RunnerConfig:
    return RunnerConfig(
        model_path=model_path,
        device=args.device,
        dtype=args.torch_dtype,
        page_size=args.page_size,
        context_length=args.context_length,
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static,
        random_seed=args.random_seed,
        moe_runner=args.moe_runner_backend,
        two_batch_overlap=args.enable_two_batch_overlap,
        attention_backend=args.attention_backend,
        cuda_graph_bs=args.cuda_graph_bs or (),
        piecewise_tokens=args.piecewise_cuda_graph_tokens or (),
        quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def scheduler_config(args: ServerArgs) -> SchedulerConfig:
    # A decode instance caches prefixes only when asked to (SGLang's default): its pages are written by transfers.
    radix_cache = not args.disable_radix_cache and (
        args.disaggregation_mode != "decode" or args.disaggregation_decode_enable_radix_cache)
    return SchedulerConfig(args.max_running_requests, args.chunked_prefill_size,
                           overlap=not args.disable_overlap_schedule, log_interval=args.decode_log_interval,
                           radix_cache=radix_cache, max_prefill_tokens=args.max_prefill_tokens,
                           prefill_wait_s=args.prefill_wait_ms / 1e3)  # fmt: skip


def moe_settings(args: ServerArgs) -> MoeContext:
    """The rank-independent part of every rank's MoeContext: backends, dispatch mode and capacity, EPLB."""
    if args.tp_size == 1:
        return MoeContext(runner=args.moe_runner_backend, single_batch_overlap=args.enable_single_batch_overlap)
    return MoeContext(
        dispatcher=args.moe_a2a_backend,
        runner=args.moe_runner_backend,
        a2a_mode=args.deepep_mode,
        # A decode-only batch holds at most max_running_requests tokens per rank (fewer after a scatter).
        max_tokens_per_rank=args.max_running_requests,
        long_seq=long_seq_config_from_env() if args.moe_a2a_backend == "torch" else None,
        eplb=eplb_config(args),
        single_batch_overlap=args.enable_single_batch_overlap,
    )


def eplb_config(args: ServerArgs) -> EplbConfig | None:
    """Physical expert placement (pd.moe.eplb) when EPLB or redundant experts are asked for, else None."""
    if not args.enable_eplb and args.ep_num_redundant_experts == 0 and args.init_expert_location is None:
        return None
    # EP ranks are laid out node after node, so they span every node when their count splits over the nodes.
    nodes = args.nnodes if args.ep_size % args.nnodes == 0 else 1
    return EplbConfig(redundant_experts=args.ep_num_redundant_experts,
                      rebalance_every=args.eplb_rebalance_num_iterations if args.enable_eplb else 0,
                      num_nodes=nodes, layers_per_chunk=args.eplb_rebalance_layers_per_chunk or 0,
                      init_location=args.init_expert_location, dump_dir=args.expert_distribution_dir,
                      min_balancedness=args.eplb_min_rebalancing_utilization_threshold)  # fmt: skip
