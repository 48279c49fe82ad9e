"""Loaded at start-up by any Python whose PYTHONPATH holds this folder: when PD_COLLECTIVE_LOG names a folder, every
torch.distributed collective the process issues is appended to PD_COLLECTIVE_LOG/<pid>.jsonl, one JSON line per call
({"fn", "dtype", "numel", "op"}; "op" is the step-sync message a uint8 broadcast carried, when it is one). Tests
read the files to count the collectives of an instance's rank processes, which they cannot reach otherwise."""

import os

if os.environ.get("PD_COLLECTIVE_LOG"):
    import functools
    import json

    import msgpack
    import torch
    import torch.distributed as dist

    _LOG_DIR = os.environ["PD_COLLECTIVE_LOG"]

    def _op_of(tensor: torch.Tensor) -> str | None:
        if tensor.dtype != torch.uint8 or tensor.numel() == 0:
            return None
        try:
            msg = msgpack.unpackb(tensor.numpy().tobytes(), raw=False)
        except Exception:
            return None
        return msg.get("op") if isinstance(msg, dict) else None

    def _logged(name: str, fn):  # type: ignore[no-untyped-def]
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = fn(*args, **kwargs)
            first = args[0] if args else None
            tensor = first[0] if isinstance(first, list) and first else first
            record = {"fn": name, "dtype": None, "numel": 0, "op": None}
            if isinstance(tensor, torch.Tensor):
                record.update(dtype=str(tensor.dtype).removeprefix("torch."), numel=tensor.numel(),
                              op=_op_of(tensor) if name == "broadcast" else None)
            # The pid at the call: a rank forked from pd serve's fork server inherits this module from it.
            with open(os.path.join(_LOG_DIR, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            return result

        return wrapper

    for _name in ("broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                  "all_to_all_single", "all_gather_object", "broadcast_object_list", "gather", "scatter", "barrier",
                  "send", "recv"):
        if hasattr(dist, _name):
            setattr(dist, _name, _logged(_name, getattr(dist, _name)))
