"""The prefill/decode load balancer (`pd lb`), wire-compatible with `sglang_router.launch_router
--pd-disaggregation`. Stages, in request order: args (flags), app (HTTP front), request (body checks and the
fields the balancer adds), policies (pair choice), workers (registry and health checks), proxy (forwarding),
metrics."""
