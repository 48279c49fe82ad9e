"""Expert placement from recorded load: which logical expert each physical expert slot holds.

One pure function, `rebalance_experts`, after DeepSeek's published EPLB policy. With expert groups that divide
evenly over the nodes (DeepSeek-V3: 8 groups) it is hierarchical, keeping a group's experts (and every replica of
them) on one node, so grouped routing crosses fewer nodes:

  1. pack the expert groups onto the nodes, balancing each node's total load;
  2. inside each node, add replicas one at a time to the expert with the highest load per replica;
  3. pack the node's physical experts onto its GPUs, balancing each GPU's load (a replica carries its expert's
     load divided by the replica count), the same number of slots per GPU.

Otherwise the same steps run with one group and one node (a global policy). Packing is greedy (heaviest item to
the lightest pack that still has room), vectorised over layers; it runs between forwards every few thousand
steps, on the host, never inside a forward.
"""

from __future__ import annotations

import torch


def balanced_packing(weight_NX: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split X items into ``num_packs`` packs of X / num_packs items each, per row, balancing pack weights.

    Args:
        weight_NX: [N, X] float item weights (N independent rows, e.g. layers).
        num_packs: must divide X.

    Returns:
        (pack_NX, rank_in_pack_NX): int64, the pack of each item and its position inside the pack.
    """
    rows, items = weight_NX.shape
    assert items % num_packs == 0, f"{items} items do not split into {num_packs} equal packs"
    per_pack = items // num_packs
    if per_pack == 1:
        ids = torch.arange(items, dtype=torch.int64).expand(rows, items).clone()
        return ids, torch.zeros_like(ids)
    weight_NX = weight_NX.double()
    order_NX = weight_NX.sort(dim=-1, descending=True, stable=True).indices
    pack_weight_NP = torch.zeros(rows, num_packs, dtype=torch.float64)
    pack_items_NP = torch.zeros(rows, num_packs, dtype=torch.int64)
    pack_NX = torch.empty(rows, items, dtype=torch.int64)
    rank_NX = torch.empty(rows, items, dtype=torch.int64)
    row = torch.arange(rows)
    for step in range(items):  # heaviest item first, into the lightest pack with room (every row at once)
        item_N = order_NX[:, step]
        open_weight_NP = pack_weight_NP.masked_fill(pack_items_NP >= per_pack, float("inf"))
        pack_N = open_weight_NP.argmin(dim=-1)
        pack_NX[row, item_N] = pack_N
        rank_NX[row, item_N] = pack_items_NP[row, pack_N]
        pack_weight_NP[row, pack_N] += weight_NX[row, item_N]
        pack_items_NP[row, pack_N] += 1
    return pack_NX, rank_NX


def replicate_experts(weight_NX: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give X logical experts ``num_physical`` slots, minimising the largest load per replica.

    Every expert keeps one slot; each extra slot goes to the expert whose load per replica is highest now (this
    greedy choice is optimal for that objective).

    Returns:
        (phy2log_NP, replica_NP, count_NX): int64; the logical expert of each slot, which replica of it the slot
        is (0-based), and each expert's replica count.
    """
    rows, experts = weight_NX.shape
    assert num_physical >= experts, f"{num_physical} slots cannot hold {experts} experts"
    weight_NX = weight_NX.double()
    phy2log_NP = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    replica_NP = torch.zeros(rows, num_physical, dtype=torch.int64)
    count_NX = torch.ones(rows, experts, dtype=torch.int64)
    row = torch.arange(rows)
    for slot in range(experts, num_physical):
        busiest_N = (weight_NX / count_NX).argmax(dim=-1)
        phy2log_NP[:, slot] = busiest_N
        replica_NP[:, slot] = count_NX[row, busiest_N]
        count_NX[row, busiest_N] += 1
    return phy2log_NP, replica_NP, count_NX


def _inverse(perm_NX: torch.Tensor) -> torch.Tensor:
    inv_NX = torch.empty_like(perm_NX)
    inv_NX.scatter_(1, perm_NX, torch.arange(perm_NX.shape[1], dtype=torch.int64).expand_as(perm_NX))
    return inv_NX


def _hierarchical(weight_LE: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int,
                  num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    layers, experts = weight_LE.shape
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = experts // num_nodes
    slots_per_node = num_physical // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # 1. groups -> nodes. "Node-major" order: node n's experts become the contiguous ids [n*E/nodes, (n+1)*E/nodes).
    group_load_LG = weight_LE.unflatten(-1, (num_groups, group_size)).sum(dim=-1)
    group_node_LG, group_rank_LG = balanced_packing(group_load_LG, num_nodes)
    first_LG = (group_node_LG * groups_per_node + group_rank_LG) * group_size
    log2node_major_LE = (first_LG.unsqueeze(-1) + torch.arange(group_size)).flatten(-2)
    node_major2log_LE = _inverse(log2node_major_LE)

    # 2. replicas inside each node (each node's experts are one row here).
    node_load_NX = weight_LE.gather(-1, node_major2log_LE).view(-1, experts_per_node)
    phy2nm_NS, _, count_NX = replicate_experts(node_load_NX, slots_per_node)

    # 3. each node's physical experts -> its GPUs.
    replica_load_NS = (node_load_NX / count_NX).gather(-1, phy2nm_NS)
    gpu_NS, rank_in_gpu_NS = balanced_packing(replica_load_NS, num_gpus // num_nodes)
    placed_NS = gpu_NS * slots_per_gpu + rank_in_gpu_NS
    placed2nm_NS = phy2nm_NS.gather(-1, _inverse(placed_NS))

    # Back to logical ids: node-local expert index + the node's first node-major id -> logical id.
    node_first = torch.arange(0, experts, experts_per_node).view(1, -1, 1)
    placed2nm_LP = (placed2nm_NS.view(layers, num_nodes, -1) + node_first).flatten(-2)
    phy2log_LP = node_major2log_LE.gather(-1, placed2nm_LP)
    count_LE = count_NX.view(layers, -1).gather(-1, log2node_major_LE)
    return phy2log_LP, count_LE


def rebalance_experts(
    weight_LE: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A placement of E logical experts on ``num_physical`` slots over ``num_gpus`` GPUs, per layer.

    Args:
        weight_LE: [L, E] load of each logical expert (e.g. routed token counts), any number type, on any device.
        num_physical: P slots in all (E plus the redundant replicas); a multiple of num_gpus.
        num_groups: expert groups of the router (1 when it has none); the hierarchical policy needs it to
            divide E and to be a multiple of num_nodes.
        num_nodes: nodes the GPUs span (GPU g is on node g // (num_gpus / num_nodes)).
        num_gpus: expert-parallel ranks; slot s lives on GPU s // (P / num_gpus).

    Returns:
        (phy2log_LP, log2phy_LER, count_LE), int64 on the CPU: the logical expert of each slot; each expert's
        slots padded with -1 to R = the largest replica count; each expert's replica count (>= 1).

    Raises:
        ValueError: P < E, or P, E and the GPU and node counts do not divide as required.
    """
    layers, experts = weight_LE.shape
    if num_physical < experts:
        raise ValueError(f"{num_physical} physical slots cannot hold {experts} experts")
    if num_gpus < 1 or num_physical % num_gpus:
        raise ValueError(f"{num_physical} physical slots do not split evenly over {num_gpus} GPUs")
    if num_nodes < 1 or num_gpus % num_nodes:
        raise ValueError(f"{num_gpus} GPUs do not split evenly over {num_nodes} nodes")
    weight_LE = weight_LE.detach().double().cpu()
    hierarchical = num_groups > 0 and experts % num_groups == 0 and num_groups % num_nodes == 0
    with torch.device("cpu"):  # host-side arithmetic whatever the ambient device
        if hierarchical:
            phy2log_LP, count_LE = _hierarchical(weight_LE, num_physical, num_groups, num_nodes, num_gpus)
        else:  # one group on one "node": a global policy
            phy2log_LP, count_LE = _hierarchical(weight_LE, num_physical, 1, 1, num_gpus)
    return phy2log_LP, log2phy_of(phy2log_LP, experts), count_LE


def log2phy_of(phy2log_LP: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[L, E, R] int64: each logical expert's slots in increasing order, padded with -1 (R = most replicas)."""
    phy2log_LP = phy2log_LP.cpu()
    with torch.device("cpu"):  # host-side arithmetic, also when called while a model is built on a GPU
        return _log2phy(phy2log_LP, num_experts)


def _log2phy(phy2log_LP: torch.Tensor, num_experts: int) -> torch.Tensor:
    layers, slots = phy2log_LP.shape
    holds_LEP = phy2log_LP.unsqueeze(1) == torch.arange(num_experts).view(1, -1, 1)
    width = max(int(holds_LEP.sum(dim=-1).max()), 1)
    # Slots that hold the expert sort first (key 0), by slot id; the others (key 1) become the -1 padding.
    key_LEP = (~holds_LEP).long() * slots + torch.arange(slots)
    order_LEP = key_LEP.sort(dim=-1).indices[..., :width]
    return torch.where(holds_LEP.gather(-1, order_LEP), order_LEP, torch.full_like(order_LEP, -1))
