"""The one helper that finds the shared assets folder (zoo models and data) for the demo, the bench and
the benchmarks: --shared, else $CASTLORA_SHARED, else ../shared."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CastloraError


def shared_dir(shared: str | None = None) -> Path:
    root = Path(shared or os.environ.get("CASTLORA_SHARED") or Path.cwd().parent / "shared")
    if not (root / "zoo").is_dir() or not (root / "data").is_dir():
        raise CastloraError(f"{root} does not hold zoo/ and data/: pass --shared or set CASTLORA_SHARED")
    return root
