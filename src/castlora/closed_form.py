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
from .heads import residual_from_stats, ridge, ridge_from_stats


def _module_out(module, x: torch.Tensor, rows) -> torch.Tensor:
    base = getattr(module, "base_layer", module)  # a peft LoRA layer: its frozen base
    y = base(x.to(base.weight.dtype))
    return y if rows is None else y[..., rows.to(y.device)]


RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class Fit:
    """Gram statistics of one regression Y ~ X P^T, kept per fold for cross-validation."""

    def __init__(self):
        self.g = [0, 0]  # X^T X
        self.c = [0, 0]  # X^T Y
        self.yy = [0.0, 0.0]  # tr(Y^T Y)

    def update(self, fold: int, x: torch.Tensor, y: torch.Tensor):
        x, y = x.double(), y.double()
        self.g[fold] = self.g[fold] + x.t() @ x
        self.c[fold] = self.c[fold] + x.t() @ y
        self.yy[fold] += float(y.pow(2).sum())

    def held_out_error(self, lam: float) -> float:
        """2-fold cross-validated relative error ||Y - X P^T||^2 / ||Y||^2 of the ridge fit."""
        err = 0.0
        for fit, test in ((0, 1), (1, 0)):
            P = ridge_from_stats(self.g[fit], self.c[fit], lam)
            err += residual_from_stats(P, self.g[test], self.c[test], self.yy[test])
        return err / max(sum(self.yy), 1e-30)

    def solve(self, lam: float | None) -> tuple[torch.Tensor, float, float | None]:
        """P on both folds; lam None = the grid value with the lowest held-out error."""
        cv = None
        if lam is None:
            if isinstance(self.g[1], int):  # one fold only: nothing to validate on
                lam = 1e-3
            else:
                errs = {x: self.held_out_error(x) for x in RIDGE_GRID}
                lam = min(errs, key=errs.get)
                cv = errs[lam]
        g = self.g[0] + self.g[1]
        return ridge_from_stats(g, self.c[0] + self.c[1], lam), lam, cv



@torch.no_grad()
def accumulate_fits(ports: list[tuple[PortedKernel, Site]], source_inner, target, source_paths: list[str],
                    batches) -> tuple[list[tuple[Fit, Fit]], int]:
    """Gram statistics of every port's input and output regression on `batches` (PairBatch list),
    two folds each (alternate batches, or alternate positions when there is one batch). Returns
    them with the number of aligned positions seen."""
    fits = [(Fit(), Fit()) for _ in ports]
    tgt_paths = [site.path for _, site in ports]
    n = 0
    for b_idx, batch in enumerate(batches):
        with capture(source_inner, inputs=source_paths) as cs:
            source_inner(input_ids=batch.ids_s, attention_mask=batch.mask_s)
        with capture(target, inputs=tgt_paths) as ct:
            target(input_ids=batch.ids_t, attention_mask=batch.mask_t)
        for (port, site), spath, (f_in, f_out) in zip(ports, source_paths, fits):
            src_mod, tgt_mod = source_inner.get_submodule(spath), target.get_submodule(site.path)
            x_s = batch.gather(cs.inputs[spath], "s")
            x_t = batch.gather(ct.inputs[site.path], "t")
            y_s = _module_out(src_mod, x_s, port.source_rows).float()
            y_t = _module_out(tgt_mod, x_t, site.rows).float()
            dev = port.in_basis.device  # statistics live with the port (the target module's device)
            x_t, z_s, y_s, y_t = x_t.float().to(dev), x_s.float().to(dev) @ port.in_basis, y_s.to(dev), y_t.to(dev)
            if len(batches) > 1:
                folds = [(b_idx % 2, slice(None))]
            else:
                folds = [(0, slice(0, None, 2)), (1, slice(1, None, 2))]
            for fold, rows in folds:
                f_in.update(fold, x_t[rows], z_s[rows])
                f_out.update(fold, y_s[rows], y_t[rows])
        n += int(batch.pos_mask.sum())
    return fits, n


def output_head_weights(ports: list[tuple[PortedKernel, Site]], fits: list[tuple[Fit, Fit]],
                        lam: float | None) -> list[torch.Tensor]:
    """Each port's closed-form output head at ridge `lam` (None: each head's cross-validated choice),
    restricted to the kernel's output basis."""
    # the statistics stay where accumulate_fits built them; attached() may since have moved the port (--device-map)
    return [(f_out.solve(lam)[0].to(port.out_basis.device) @ port.out_basis.double()).float()
            for (port, _), (_, f_out) in zip(ports, fits)]


@torch.no_grad()
def apply_fits(ports: list[tuple[PortedKernel, Site]], fits: list[tuple[Fit, Fit]], lam: float | None,
               positions: int) -> dict:
    """Set every port's heads to the ridge solution of its statistics (accumulate_fits). Returns stats."""
    chosen = []
    for (port, _), (f_in, f_out) in zip(ports, fits):
        p_in, lam_in, cv_in = f_in.solve(lam)  # r x d_in_T
        p_out_full, lam_out, cv_out = f_out.solve(lam)  # d_out_T x d_out_S
        port.p_in.linear_part().copy_(p_in.float())
        port.p_out.linear_part().copy_((p_out_full @ port.out_basis.double()).float())
        chosen.append({"kernel": port.source_key, "ridge_in": lam_in, "ridge_out": lam_out,
                       "cv_error_in": None if cv_in is None else round(cv_in, 5),
                       "cv_error_out": None if cv_out is None else round(cv_out, 5)})
    return {"calibration_positions": positions, "ridge": lam if lam is not None else "cross-validated",
            "heads": chosen}


# The fp64 statistics kept at once, in bytes: ports beyond it are fitted in further passes over the calibration
# batches. One port holds two folds of its input Gram (d_in_T^2), its output Gram (d_out_S^2) and the cross
# term (d_out_S x d_out_T): ~0.8 GB for a 7B q projection, ~45 GB for a rank-8 LoRA on q and v over 32 layers,
# ~515 GB for one on every linear layer (Llama-2-7B -> Mistral-7B, docs/performance.md). The zoo's ports
# all fit in one group (one pass, as before).
STATS_BUDGET_BYTES = 8 * 2**30


def stats_bytes(port: PortedKernel) -> int:
    """The fp64 statistics accumulate_fits keeps for `port`, in bytes (both folds)."""
    d_in_t, d_out_s = port.p_in.linear_part().shape[1], port.out_basis.shape[0]
    d_out_t = port.p_out.linear_part().shape[0]
    return 8 * 2 * (d_in_t ** 2 + d_out_s ** 2 + d_out_s * d_out_t)


def port_groups(ports: list[tuple[PortedKernel, Site]], budget: int, size_of=stats_bytes) -> list[list[int]]:
    """Consecutive runs of port indices whose statistics (`size_of(port)` bytes each) fit in `budget` bytes
    (a port over it alone)."""
    groups, size = [], 0
    for i, (port, _) in enumerate(ports):
        b = size_of(port)
        if not groups or size + b > budget:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += b
    return groups


@torch.no_grad()
def fit_closed_form(ports: list[tuple[PortedKernel, Site]], source_inner, target, source_paths: list[str],
                    batches, lam: float | None = None, ridges: tuple = (),
                    budget: int = STATS_BUDGET_BYTES) -> tuple[dict, dict[float, list[torch.Tensor]]]:
    """Set every port's heads to the ridge solution on `batches` (PairBatch list), in groups of ports whose
    statistics fit in `budget` bytes: one pass over the batches per group, each group's statistics freed before
    the next. Returns apply_fits's stats and, for each ridge in `ridges`, every port's output head at that ridge
    (output_head_weights).

    `lam` None (the default): each head's penalty is chosen from RIDGE_GRID by 2-fold
    cross-validation (alternate batches, or alternate positions when there is one batch). The
    right penalty differs by orders of magnitude: near zero when source and target are the same
    model (the fit must be the identity), larger across families where the relation is noisy.
    """
    groups = port_groups(ports, budget)
    heads, positions = [], 0
    at_ridge: dict[float, list[torch.Tensor]] = {r: [] for r in ridges}
    for group in groups:
        sub = [ports[i] for i in group]
        fits, positions = accumulate_fits(sub, source_inner, target, [source_paths[i] for i in group], batches)
        for r in ridges:
            at_ridge[r] += output_head_weights(sub, fits, r)
        heads += apply_fits(sub, fits, lam, positions)["heads"]
        del fits
    info = {"calibration_positions": positions, "ridge": lam if lam is not None else "cross-validated",
            "heads": heads}
    if len(groups) > 1:
        info["statistics_passes"] = len(groups)
    return info, at_ridge


def closed_form_init(ports: list[tuple[PortedKernel, Site]], source_inner, target, source_paths: list[str],
                     batches, lam: float | None = None) -> dict:
    """fit_closed_form's stats alone."""
    return fit_closed_form(ports, source_inner, target, source_paths, batches, lam)[0]


@torch.no_grad()
def random_init(ports: list[tuple[PortedKernel, Site]], seed: int = 0) -> None:
    """Random heads (the control): each head maps unit-variance inputs to unit-variance outputs."""
    g = torch.Generator().manual_seed(seed)
    for port, _ in ports:
        for head in (port.p_in, port.p_out):
            w = head.linear_part()
            w.copy_(torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5)


@torch.no_grad()
def zero_output_heads(ports: list[tuple[PortedKernel, Site]]) -> None:
    """Output heads to zero (MLP heads' residual branch is zero already): the ported delta is zero,
    and the gradient still reaches the output heads through the input heads' features."""
    for port, _ in ports:
        port.p_out.linear_part().zero_()


__all__ = ["accumulate_fits", "apply_fits", "closed_form_init", "fit_closed_form", "output_head_weights", "random_init", "zero_output_heads", "ridge"]


_Fit = Fit  # the old private name
