"""Where pd keeps what it builds once per machine (the default model, compiled CPU kernels)."""

from __future__ import annotations

import os


def default_cache_dir() -> str:
    """$PD_CACHE_DIR, else ~/.cache/pd."""
    return os.environ.get("PD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pd")
