"""Checks on the user's paths that run before anything is loaded or written.

`check_output_path` refuses an --out whose writing (atomic_folder replaces the whole folder, with
--overwrite too) would destroy one of the run's inputs, the current directory, the home directory or
a filesystem root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from .errors import CastloraError

PathLike = str | os.PathLike


def _inputs(inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> Iterable[tuple[str, Path]]:
    """(flag, local path) of every input that exists here; hub ids and dataset names are skipped."""
    for flag, value in inputs.items():
        if value is None:
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        for v in values:
            if v is None or str(v) == "":
                continue
            p = Path(v).expanduser()
            if p.exists():
                yield flag, p.resolve()


def _kind(p: Path) -> str:
    return "folder" if p.is_dir() else "file"


def check_output_path(out: PathLike, inputs: Mapping[str, PathLike | Iterable[PathLike] | None]) -> None:
    """Refuse an --out that is, contains or lies inside an input (symlinks resolved), that is the current
    directory (or holds it), the home directory or a filesystem root, or that is a dangling symlink.

    `inputs` maps a flag name (e.g. "--adapter", "--corpus") to a path or a list of paths; paths that do
    not exist here (hub ids, dataset names) are ignored. Raises CastloraError; --overwrite changes nothing.
    """
    raw = str(out)
    out_p = Path(out).expanduser()
    if raw.strip() == "":
        raise CastloraError("--out is empty: name a new folder for the output")
    if out_p.is_symlink() and not out_p.exists():
        raise CastloraError(f"--out {raw} is a dangling symlink (to {os.readlink(out_p)}): remove the link "
                            "or choose another --out")
    # Where the writes land: the resolved target, and (for a symlink) the link's own place.
    targets = {out_p.resolve(), out_p.absolute().parent.resolve() / out_p.name}
    resolved = out_p.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if raw in (".", "./") or resolved == cwd:
        raise CastloraError(f"--out {raw} is the current directory: writing there would replace it; "
                            "choose a new folder for --out")
    if resolved.parent == resolved:
        raise CastloraError(f"--out {raw} is a filesystem root: choose a new folder for --out")
    if resolved == home:
        raise CastloraError(f"--out {raw} is the home directory: choose a new folder for --out")
    for place, what in ((cwd, "the current directory"), (home, "the home directory")):
        if resolved in place.parents:
            raise CastloraError(f"--out {raw} contains {what} ({place}): writing there would replace it; "
                                "choose a new folder for --out")
    for flag, inp in _inputs(inputs):
        kind = _kind(inp)
        for t in targets:
            if t == inp:
                why = f"is the {flag} {kind} ({inp})"
            elif inp in t.parents:
                why = f"lies inside the {flag} {kind} {inp}"
            elif t in inp.parents:
                why = f"contains the {flag} {kind} {inp}"
            else:
                continue
            raise CastloraError(f"--out {raw} {why}: writing there would destroy an input; choose another --out")
