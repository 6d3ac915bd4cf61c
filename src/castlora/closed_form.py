"""CAST-0: the closed-form (ridge) start for every head, from activations on aligned positions.

P_in  = ridge regression from target module inputs x_T to the source module inputs in the
        kernel's input basis (in_basis^T x_S);
P_out = ridge regression from source module outputs W_S x_S to target module outputs W_T x_T,
        restricted to the kernel's output basis (P_out_full @ out_basis).
Statistics are accumulated as Gram matrices batch by batch, so memory does not grow with the
number of calibration positions.
"""

from __future__ import annotations

import torch

from .cast_module import PortedKernel
from .capture import capture
from .families import Site
from .heads import ridge


def gather_aligned(x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows of x (B x L x d) at positions pos (B x P) where mask (B x P) is True -> (N x d)."""
    pos, mask = pos.to(x.device), mask.to(x.device)  # sharded models: x may live on any device
    rows = torch.arange(pos.shape[0], device=x.device)[:, None].expand_as(pos)
    return x[rows[mask], pos[mask]]  # advanced indexing: no (B, P, d) index tensor


def _module_out(module, x: torch.Tensor, rows) -> torch.Tensor:
    base = getattr(module, "base_layer", module)  # a peft LoRA layer: its frozen base
    y = base(x.to(base.weight.dtype))
    return y if rows is None else y[..., rows.to(y.device)]


class _Stats:
    def __init__(self):
        self.g_in = self.xz = self.g_out = self.yy = None
        self.n = 0

    @staticmethod
    def _add(acc, m):
        return m if acc is None else acc + m

    def update(self, x_t, z_s, y_s, y_t):
        x_t, z_s, y_s, y_t = (t.double() for t in (x_t, z_s, y_s, y_t))
        self.g_in = self._add(self.g_in, x_t.t() @ x_t)
        self.xz = self._add(self.xz, x_t.t() @ z_s)
        self.g_out = self._add(self.g_out, y_s.t() @ y_s)
        self.yy = self._add(self.yy, y_s.t() @ y_t)
        self.n += x_t.shape[0]


def _solve(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    reg = lam * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross).t()


@torch.no_grad()
def closed_form_init(ports: list[tuple[PortedKernel, Site]], source_inner, target, source_paths: list[str],
                     batches, lam: float = 1e-2) -> dict:
    """Set every port's heads to the ridge solution on `batches` (PairBatch list). Returns stats."""
    stats = [_Stats() for _ in ports]
    tgt_paths = [site.path for _, site in ports]
    for batch in batches:
        with capture(source_inner, inputs=source_paths) as cs:
            source_inner(input_ids=batch.ids_s, attention_mask=batch.mask_s)
        with capture(target, inputs=tgt_paths) as ct:
            target(input_ids=batch.ids_t, attention_mask=batch.mask_t)
        for (port, site), spath, st in zip(ports, source_paths, stats):
            src_mod, tgt_mod = source_inner.get_submodule(spath), target.get_submodule(site.path)
            x_s = gather_aligned(cs.inputs[spath], batch.pos_s, batch.pos_mask)
            x_t = gather_aligned(ct.inputs[site.path], batch.pos_t, batch.pos_mask)
            y_s = _module_out(src_mod, x_s, port.source_rows).float()
            y_t = _module_out(tgt_mod, x_t, site.rows).float()
            dev = port.in_basis.device  # statistics live with the port (the target module's device)
            st.update(x_t.float().to(dev), x_s.float().to(dev) @ port.in_basis, y_s.to(dev), y_t.to(dev))
    for (port, site), st in zip(ports, stats):
        p_in = _solve(st.g_in, st.xz, lam)  # r x d_in_T
        p_out_full = _solve(st.g_out, st.yy, lam)  # d_out_T x d_out_S
        port.p_in.linear_part().copy_(p_in.float())
        port.p_out.linear_part().copy_((p_out_full @ port.out_basis.double()).float())
    return {"calibration_positions": stats[0].n if stats else 0, "ridge": lam}


@torch.no_grad()
def random_init(ports: list[tuple[PortedKernel, Site]], seed: int = 0) -> None:
    """Random heads (the control): each head maps unit-variance inputs to unit-variance outputs."""
    g = torch.Generator().manual_seed(seed)
    for port, _ in ports:
        for head in (port.p_in, port.p_out):
            w = head.linear_part()
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)


__all__ = ["closed_form_init", "random_init", "gather_aligned", "ridge"]
