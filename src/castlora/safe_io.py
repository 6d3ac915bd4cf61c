"""Reading and writing tensors and folders safely.

safetensors only by default: a pickle (.bin/.pt) can run arbitrary code when loaded, so it is
refused unless the user passes allow_pickle=True, and even then it is loaded with
`weights_only=True`. Outputs are written into a temporary sibling folder and renamed into place
at the end, so an interrupted or failed write never leaves a half-written folder where a finished
one is expected.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
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
            text = str(e)
            # torch's message is a page of advice (ending in "load it with weights_only=False", i.e.
            # run its code); keep only the reason, e.g. "Unsupported global: GLOBAL getattr ...".
            m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: Please use|\n|$)", text)
            reason = m[1].strip() if m else (text.strip().splitlines() or [repr(e)])[0][:300]
            raise CastloraError(
                f"{path}: cannot be read as a weights-only pickle ({reason}). castlora loads pickles "
                "weights-only and never runs code from them: convert it to safetensors where you trust it.") from e
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CastloraError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e


DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How a full disk reads when a library wraps the OSError in its own exception (safetensors does).
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122",
                   "storagefull", "quotaexceeded")


def is_disk_full(e: BaseException | None) -> bool:
    """True when `e` (or an exception it was raised from) says the disk or the quota is full."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(e).lower() for t in _DISK_FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _default_dir_mode() -> int:
    """The mode `mkdir` gives a new folder: 0o777 less the process umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a whole folder, read-only parts included."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
        return

    def retry(func, p, _exc):  # a read-only folder inside: make it writable (never above `path`), try again
        try:
            parent = os.path.dirname(p)
            if parent == str(path) or parent.startswith(str(path) + os.sep):
                os.chmod(parent, 0o700)
            if not os.path.islink(p) and os.path.isdir(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


@contextmanager
def atomic_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success rename it to `out`.

    On any exception the temporary folder is removed and `out` is left as it was; a full disk
    becomes a CastloraError that says so. With `overwrite`, an `out` that is a symlink is replaced by
    the new folder itself (the link is removed, what it pointed to is left alone). The new folder gets
    the usual mode of a new folder (0o777 less the umask), and no `.NAME.old-*` is left behind.
    """
    out = Path(out)
    existed = out.is_symlink() or out.exists()
    if existed and not overwrite:
        what = f"a symlink to {os.readlink(out)}" if out.is_symlink() else "it exists"
        raise CastloraError(f"output folder {out} already exists ({what}): choose another --out or pass --overwrite")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        os.chmod(tmp, _default_dir_mode())  # mkdtemp makes it 0700
        yield tmp
        if out.is_symlink() or out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            old.rmdir()  # a unique free name: os.replace cannot move a folder onto a non-empty one
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous output back
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise CastloraError(
                f"disk full while writing {out}: {e}. Nothing was written to {out} "
                f"({'it was left as it was' if existed else 'the partial output was removed'}); "
                "free some space or choose an --out on another disk, and run again") from e
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a whole text file via a temporary sibling and a rename: readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
