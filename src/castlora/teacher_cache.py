"""A precomputed teacher: run the source once, and let later runs stream it from disk.

Everything a CAST step needs from the source side is a function of the batch: the teacher's
log-distribution over the shared vocabulary at the aligned positions, and (for the MSE term)
each kernel's view of its source-site inputs, `in_basis^T x_S` (r numbers per position per
kernel, not d), and with `--position-weight lora-effect` each position's weight. `--teacher-cache DIR` stores them per step, the distribution as its top-k
(log-probs + token indices; the rest of the mass is kept as one bucket by `losses.topk_kl`).
The first run fills DIR as it trains; a later run with the same teacher (other heads, lr, beta,
layer map...) reads the steps it finds and skips the source forward for them.

Layout: DIR/manifest.json (what the teacher is: any mismatch is an error, never a silent reuse)
and DIR/step_NNNNNN.safetensors, each written to a temporary name and renamed, so an interrupted
run leaves only whole files. Each step file records a fingerprint of its batch: a changed corpus,
seed or batch size is caught on read.

Disk per step: aligned positions x (8 * top_k + 2 * r * kernels) bytes, e.g. 1k positions,
top-k 128, 12 rank-8 kernels: 1 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CastloraError
from .safe_io import write_text_atomic
from .tokens import PairBatch

FORMAT = 1


@dataclass
class TeacherOutput:
    """The source side of one step. Either `logp` (N x V_shared) or its top-k (`values`, `index`)."""
    logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    index: torch.Tensor | None = None
    z: list[torch.Tensor] | None = None  # per port: in_basis^T x_S at the aligned positions (N x r)
    weight: torch.Tensor | None = None  # per aligned position: its weight in the KL (None = uniform)

    def to(self, device) -> "TeacherOutput":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TeacherOutput(mv(self.logp), mv(self.values), mv(self.index),
                             None if self.z is None else [mv(t) for t in self.z], mv(self.weight))

    def top_k(self, k: int) -> "TeacherOutput":
        """Keep the k most likely pieces (stored at float32, indices int32), z at bfloat16."""
        k = min(k, self.logp.shape[-1])
        values, index = self.logp.topk(k, dim=-1)
        z = None if self.z is None else [t.to(torch.bfloat16).float() for t in self.z]
        return TeacherOutput(None, values.float(), index.int(), z, self.weight)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def text_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def batch_fingerprint(batch: PairBatch) -> str:
    h = hashlib.sha256()
    for t in (batch.ids_s, batch.mask_s, batch.ids_t, batch.pos_s, batch.pos_t, batch.pos_mask):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


class TeacherCache:
    def __init__(self, folder: str | Path, key: dict, top_k: int):
        if top_k < 1:
            raise CastloraError(f"--teacher-top-k must be >= 1, not {top_k}")
        self.folder, self.top_k = Path(folder), top_k
        self.key = {**key, "top_k": top_k, "format": FORMAT}
        self.hits = self.misses = 0
        manifest = self.folder / "manifest.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise CastloraError(f"--teacher-cache {self.folder} exists and is not a folder")
        if manifest.exists():
            saved = json.loads(manifest.read_text())
            diff = sorted(k for k in set(saved) | set(self.key) if saved.get(k) != self.key.get(k))
            if diff:
                raise CastloraError(
                    f"the teacher cache {self.folder} was made for another teacher (differs in: {', '.join(diff)}). "
                    "Use a new --teacher-cache folder, or delete this one to rebuild it")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_text_atomic(manifest, json.dumps(self.key, indent=1))

    def _path(self, step: int) -> Path:
        return self.folder / f"step_{step:06d}.safetensors"

    def load(self, step: int, batch: PairBatch) -> TeacherOutput | None:
        path = self._path(step)
        if not path.exists():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or foreign file: say which, never train on it
            raise CastloraError(f"{path} is not a readable teacher-cache file ({e}). Delete it (it is recomputed) "
                                "or use a new --teacher-cache folder") from e
        if meta.get("batch") != batch_fingerprint(batch):
            raise CastloraError(
                f"{path} was computed on another batch than step {step} of this run (the corpus, seed, "
                "batch size, sequence length or generated text changed). Use a new --teacher-cache folder")
        n = int(meta.get("ports", -1))
        out = TeacherOutput(values=tensors["values"], index=tensors["index"],
                            z=[tensors[f"z.{i}"].float() for i in range(n)] if n > 0 else None,
                            weight=tensors.get("weight"))
        self.hits += 1
        return out

    def save(self, step: int, batch: PairBatch, teacher: TeacherOutput) -> None:
        tensors = {"values": teacher.values.detach().cpu().contiguous(),
                   "index": teacher.index.detach().cpu().contiguous()}
        if teacher.weight is not None:
            tensors["weight"] = teacher.weight.detach().float().cpu().contiguous()
        for i, z in enumerate(teacher.z or []):
            tensors[f"z.{i}"] = z.detach().to(torch.bfloat16).cpu().contiguous()
        path = self._path(step)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"batch": batch_fingerprint(batch),
                                               "ports": str(len(teacher.z) if teacher.z else -1)})
        os.replace(tmp, path)
