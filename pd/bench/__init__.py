"""`pd bench`: a serving benchmark client for `pd serve`, a PD cluster behind a load balancer, or any
SGLang-compatible endpoint (native /generate, OpenAI /v1/completions or /v1/chat/completions; streamed or not).

Modules follow the run: args (flags) -> datasets, corpus, conversations (prompts, real text, multi-turn chats)
-> client (one timed request) -> runner (pacing, concurrency, warm-up) -> report, goodput (percentiles,
throughput, SLOs, table, JSON) -> plots (PNG files).
"""
