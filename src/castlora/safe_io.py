"""Reading and writing tensors and folders safely.

safetensors only by default: a pickle (.bin/.pt) can run arbitrary code when loaded, so it is
refused unless the user passes allow_pickle=True, and even then it is loaded with
`weights_only=True`. Outputs are written into a temporary sibling folder and renamed into place
at the end, so an interrupted or failed write never leaves a half-written folder where a finished
one is expected.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import CastloraError, UnsafeFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def load_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path} is a pickle file: loading it can execute arbitrary code. Convert it to "
                "safetensors, or pass --allow-pickle (allow_pickle=True) if you trust its origin.")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the user's file
            raise CastloraError(f"{path}: cannot be read as a weights-only pickle: {e}") from e
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CastloraError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`.

    On any exception the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise CastloraError(f"output folder {out} already exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
