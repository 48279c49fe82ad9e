"""Expert-parallel load balancing: placement policy, per-layer routing and load, weight moves, the manager."""
