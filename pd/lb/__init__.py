"""The load balancer (`pd lb`), wire-compatible with `sglang_router.launch_router` in PD mode (`--pd-disaggregation`:
prefill/decode pairs) and in regular mode (`--worker-urls`: unified instances). Stages, in request order: args
(flags), app (HTTP front), request (body checks, the routing text, the fields the balancer adds), policies (instance
choice; cache_aware: prefix affinity), workers (registry and health checks), proxy (forwarding), metrics."""
