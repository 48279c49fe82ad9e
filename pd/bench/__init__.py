"""`pd bench`: a serving benchmark client for `pd serve`, a PD cluster behind a load balancer, or any
SGLang-compatible endpoint (native /generate or OpenAI /v1/completions, streamed).

Modules follow the run: args (flags) -> datasets (prompts) -> client (one timed request) -> runner (pacing,
concurrency, warm-up) -> report (percentiles, throughput, table, JSON).
"""
