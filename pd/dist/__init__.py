"""Multi-rank instances: rank layout, process groups, tensor-parallel layers, and the rank processes."""
