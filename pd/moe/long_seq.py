"""Long-sequence ("ant-moving") rounds of normal-mode dispatch/combine, and the HCCL_BUFFSIZE they need.

A prefill batch can hold tens of thousands of tokens per rank. Normal-mode dispatch then moves them in rounds
of at most ``per_round_tokens`` tokens per rank, so communication buffers are sized per round, not per sequence.
The settings are the environment variables DeepEP-Ascend reads (sgl-project/sgl-kernel-npu,
csrc/deepep/deep_ep.cpp, ``Buffer::Buffer``); they are read here, once, and passed down as a frozen config:

- ``DEEPEP_NORMAL_LONG_SEQ_ROUND``: rounds per dispatch, in [1, 256];
- ``DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS``: tokens per rank per round, in [32, 8192];
- ``DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ``: combine in rounds too (off by default);
- ``HCCL_BUFFSIZE``: the communication buffer of one HCCL communicator, in MB (checked, never set, here).

The first two come together or not at all, and ROUND x PER_ROUND_TOKENS <= 131072, as DeepEP-Ascend asserts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_ROUNDS = "DEEPEP_NORMAL_LONG_SEQ_ROUND"
ENV_PER_ROUND_TOKENS = "DEEPEP_NORMAL_LONG_SEQ_PER_ROUND_TOKENS"
ENV_COMBINE = "DEEPEP_NORMAL_COMBINE_ENABLE_LONG_SEQ"
ENV_HCCL_BUFFSIZE = "HCCL_BUFFSIZE"

# DeepEP-Ascend's host checks (deep_ep.cpp: MAX_ROUNDS, MIN/MAX_TOKENS_PER_ROUND, MAX_TOTAL_TOKENS).
MAX_ROUNDS = 256
MIN_TOKENS_PER_ROUND = 32
MAX_TOKENS_PER_ROUND = 8192
MAX_TOTAL_TOKENS = 131072

_MIB = 1024 * 1024
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class LongSeqConfig:
    """Ant-moving settings of one instance.

    Attributes:
        per_round_tokens: tokens each rank moves per round; None = rounds disabled (one round of any size).
        rounds: the most rounds one dispatch may take (1 when disabled).
        combine_enabled: combine also moves at most ``per_round_tokens`` tokens per rank per round.
        hccl_buffsize_mb: the configured HCCL_BUFFSIZE in MB, or None when unset (HCCL's default is 200).

    Raises:
        ValueError: a value out of DeepEP-Ascend's ranges, or rounds x per_round_tokens > 131072.
    """

    per_round_tokens: int | None = None
    rounds: int = 1
    combine_enabled: bool = False
    hccl_buffsize_mb: int | None = None

    def __post_init__(self) -> None:
        if self.per_round_tokens is None:
            if self.rounds != 1 or self.combine_enabled:
                raise ValueError(
                    f"{ENV_ROUNDS} and {ENV_COMBINE} need {ENV_PER_ROUND_TOKENS}; set both "
                    f"{ENV_ROUNDS} and {ENV_PER_ROUND_TOKENS}, or neither"
                )
            return
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise ValueError(f"{ENV_ROUNDS}={self.rounds} must be in [1, {MAX_ROUNDS}]")
        if not MIN_TOKENS_PER_ROUND <= self.per_round_tokens <= MAX_TOKENS_PER_ROUND:
            raise ValueError(
                f"{ENV_PER_ROUND_TOKENS}={self.per_round_tokens} must be in "
                f"[{MIN_TOKENS_PER_ROUND}, {MAX_TOKENS_PER_ROUND}]"
            )
        if self.capacity > MAX_TOTAL_TOKENS:
            raise ValueError(
                f"{ENV_ROUNDS} x {ENV_PER_ROUND_TOKENS} = {self.rounds} x {self.per_round_tokens} = "
                f"{self.capacity} exceeds {MAX_TOTAL_TOKENS} tokens per rank; lower one of them"
            )
        if self.hccl_buffsize_mb is not None and self.hccl_buffsize_mb < 1:
            raise ValueError(f"{ENV_HCCL_BUFFSIZE}={self.hccl_buffsize_mb} must be >= 1 (MB)")

    @property
    def enabled(self) -> bool:
        return self.per_round_tokens is not None

    @property
    def capacity(self) -> int | None:
        """Tokens per rank one dispatch can move (rounds x per_round_tokens); None = unbounded."""
        return None if self.per_round_tokens is None else self.rounds * self.per_round_tokens


def _positive_int(environ: Mapping[str, str], name: str) -> int:
    raw = environ[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"{name}={value} must be a positive integer")
    return value


def long_seq_config_from_env(environ: Mapping[str, str] | None = None) -> LongSeqConfig:
    """Read the ant-moving variables and HCCL_BUFFSIZE (the only place they are read).

    Args:
        environ: the environment to read; ``os.environ`` when None.

    Returns:
        The validated LongSeqConfig (rounds disabled when neither round variable is set).

    Raises:
        ValueError: one of ROUND / PER_ROUND_TOKENS set without the other, the combine flag set without them,
            a malformed or out-of-range value, or ROUND x PER_ROUND_TOKENS > 131072.
    """
    env = os.environ if environ is None else environ
    has_rounds, has_tokens = ENV_ROUNDS in env, ENV_PER_ROUND_TOKENS in env
    if has_rounds != has_tokens:
        given, missing = (ENV_ROUNDS, ENV_PER_ROUND_TOKENS) if has_rounds else (ENV_PER_ROUND_TOKENS, ENV_ROUNDS)
        raise ValueError(f"{given} is set but {missing} is not; set both (or neither) to use long-sequence rounds")
    combine_raw = env.get(ENV_COMBINE, "0").strip().lower()
    if combine_raw not in _TRUE + _FALSE:
        raise ValueError(f"{ENV_COMBINE}={env[ENV_COMBINE]!r} must be 0 or 1")
    combine = combine_raw in _TRUE
    if combine and not has_rounds:
        raise ValueError(f"{ENV_COMBINE}=1 needs {ENV_ROUNDS} and {ENV_PER_ROUND_TOKENS} to be set")
    hccl = _positive_int(env, ENV_HCCL_BUFFSIZE) if ENV_HCCL_BUFFSIZE in env else None
    if not has_rounds:
        return LongSeqConfig(hccl_buffsize_mb=hccl)
    return LongSeqConfig(
        per_round_tokens=_positive_int(env, ENV_PER_ROUND_TOKENS),
        rounds=_positive_int(env, ENV_ROUNDS),
        combine_enabled=combine,
        hccl_buffsize_mb=hccl,
    )


def check_tokens_per_rank(config: LongSeqConfig, num_tokens: int) -> None:
    """Fail before dispatch when one rank holds more tokens than the configured rounds can move.

    Raises:
        ValueError: ``num_tokens > rounds x per_round_tokens`` (never raised when rounds are disabled).
    """
    capacity = config.capacity
    if capacity is not None and num_tokens > capacity:
        raise ValueError(
            f"a batch holds {num_tokens} tokens on one rank, but {ENV_ROUNDS} x {ENV_PER_ROUND_TOKENS} = "
            f"{config.rounds} x {config.per_round_tokens} = {capacity}; raise {ENV_ROUNDS} (up to "
            f"{MAX_TOTAL_TOKENS // config.per_round_tokens} at this round size) or lower --chunked-prefill-size"
        )


# HCCL_BUFFSIZE (MB) for DeepEP-Ascend normal mode, from SGLang's documentation (docs/advanced_features/
# expert_parallelism.md, "DeepEP Ascend Introduction"):
#   with rounds:    HCCL_BUFFSIZE >= 2 * (102MB + 4MB + PER_ROUND_TOKENS * (hidden + hidden + hidden) * topk) + PADDING
#   without rounds: HCCL_BUFFSIZE >= 2 * (102MB + 4MB + TOTAL_SEQ_LEN * (hidden + hidden) * topk) + PADDING
# with PADDING_BUFFSIZE >= 20 recommended. The token term is in bytes; we convert it to MB (1 MB = 2**20 bytes, as
# HCCL counts) and round up. sgl-kernel-npu's A2 guide writes hidden * 3 in both cases, a stricter bound.
_HCCL_FIXED_MB = 102 + 4
DEFAULT_PADDING_MB = 20


def _token_term_mb(tokens: int, hidden_size: int, hidden_copies: int, top_k: int) -> int:
    return math.ceil(tokens * hidden_copies * hidden_size * top_k / _MIB)


def hccl_buffsize_with_rounds_mb(
    per_round_tokens: int, hidden_size: int, top_k: int, padding_mb: int = DEFAULT_PADDING_MB
) -> int:
    """Smallest HCCL_BUFFSIZE (MB) for normal mode with ant-moving rounds (formula above)."""
    return 2 * (_HCCL_FIXED_MB + _token_term_mb(per_round_tokens, hidden_size, 3, top_k)) + padding_mb


def hccl_buffsize_without_rounds_mb(
    total_seq_len: int, hidden_size: int, top_k: int, padding_mb: int = DEFAULT_PADDING_MB
) -> int:
    """Smallest HCCL_BUFFSIZE (MB) for normal mode moving ``total_seq_len`` tokens per rank at once."""
    return 2 * (_HCCL_FIXED_MB + _token_term_mb(total_seq_len, hidden_size, 2, top_k)) + padding_mb


def required_hccl_buffsize_mb(
    config: LongSeqConfig, hidden_size: int, top_k: int, max_tokens_per_rank: int, padding_mb: int = DEFAULT_PADDING_MB
) -> int:
    """HCCL_BUFFSIZE (MB) this instance needs: the per-round formula when rounds are on, else the whole batch's."""
    if config.per_round_tokens is not None:
        return hccl_buffsize_with_rounds_mb(config.per_round_tokens, hidden_size, top_k, padding_mb)
    return hccl_buffsize_without_rounds_mb(max_tokens_per_rank, hidden_size, top_k, padding_mb)


def check_hccl_buffsize(config: LongSeqConfig, hidden_size: int, top_k: int, max_tokens_per_rank: int) -> None:
    """Startup check for HCCL backends: the configured HCCL_BUFFSIZE must hold one round (or the whole batch).

    Raises:
        ValueError: HCCL_BUFFSIZE (200 MB when unset) is below ``required_hccl_buffsize_mb``.
    """
    required = required_hccl_buffsize_mb(config, hidden_size, top_k, max_tokens_per_rank)
    configured = 200 if config.hccl_buffsize_mb is None else config.hccl_buffsize_mb
    if configured < required:
        raise ValueError(
            f"{ENV_HCCL_BUFFSIZE}={configured} MB is too small: normal-mode dispatch needs >= {required} MB "
            f"(hidden_size={hidden_size}, top_k={top_k}, {_describe_rounds(config, max_tokens_per_rank)}); "
            f"export {ENV_HCCL_BUFFSIZE}={required} or enable/shrink long-sequence rounds"
        )


def _describe_rounds(config: LongSeqConfig, max_tokens_per_rank: int) -> str:
    if config.per_round_tokens is None:
        return f"no rounds, {max_tokens_per_rank} tokens per rank"
    combine = "on" if config.combine_enabled else "off"
    return f"{config.rounds} rounds x {config.per_round_tokens} tokens, combine rounds {combine}"


def hccl_buffsize_report(config: LongSeqConfig, hidden_size: int, top_k: int, max_tokens_per_rank: int) -> str:
    """Human-readable HCCL_BUFFSIZE sizing for a ``pd`` subcommand: settings, requirement, verdict (no exception)."""
    required = required_hccl_buffsize_mb(config, hidden_size, top_k, max_tokens_per_rank)
    configured = config.hccl_buffsize_mb
    lines = [
        f"long-sequence rounds: {_describe_rounds(config, max_tokens_per_rank)}",
        f"hidden_size={hidden_size} top_k={top_k} max_tokens_per_rank={max_tokens_per_rank}",
        f"required {ENV_HCCL_BUFFSIZE} >= {required} MB (padding {DEFAULT_PADDING_MB} MB included)",
    ]
    if config.capacity is not None and max_tokens_per_rank > config.capacity:
        lines.append(
            f"ERROR: {max_tokens_per_rank} tokens per rank exceed rounds x tokens = {config.capacity}; "
            f"raise {ENV_ROUNDS} or lower --chunked-prefill-size"
        )
    if configured is None:
        verdict = "OK" if required <= 200 else f"TOO SMALL: export {ENV_HCCL_BUFFSIZE}={required}"
        lines.append(f"configured {ENV_HCCL_BUFFSIZE}: unset (HCCL default 200 MB) -> {verdict}")
    else:
        verdict = "OK" if configured >= required else f"TOO SMALL: export {ENV_HCCL_BUFFSIZE}={required}"
        lines.append(f"configured {ENV_HCCL_BUFFSIZE}={configured} MB -> {verdict}")
    return "\n".join(lines)
