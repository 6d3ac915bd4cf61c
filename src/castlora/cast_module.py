"""The runtime CAST wrapper: y = W_T x + s * P_out(B_S A_S P_in(x)) on a target module.

`PortedKernel` holds one frozen source LoRA kernel in its SVD form and the two trainable heads;
`CastLinear` wraps a target module (like peft's LoRA layer wraps `base_layer`) and adds the
deltas of every kernel ported onto it — into the role's rows when the module is fused.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .adapters import LoraKernel
from .families import Site
from .heads import LinearHead, make_head


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: accelerate's hook says so for dispatched/offloaded modules (whose
    weights may sit on the meta device between calls), else its parameters' device."""
    hook_dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_dev is not None:
        return torch.device(hook_dev if not isinstance(hook_dev, int) else f"cuda:{hook_dev}")
    dev = next(module.parameters()).device
    return torch.device("cpu") if dev.type == "meta" else dev


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its input embedding's execution device (with --device-map the model's first
    parameter may be offloaded, on the meta device)."""
    return execution_device(model.get_input_embeddings())


class PortedKernel(nn.Module):
    """A source kernel `s * B A` seen through its subspaces, with heads into/out of them.

    A = U S Vh gives the input basis Vh^T (d_in_S x r); B U S = Uk Sk Wk^T gives the output basis
    Uk (d_out_S x r) and the r x r core Sk Wk^T, so s * B A x = s * Uk core Vh x exactly.
    The heads replace Vh (P_in: d_in_T -> r) and Uk (P_out: r -> d_out_T).
    """

    def __init__(self, kernel: LoraKernel, target: Site, head: str = "linear"):
        super().__init__()
        A, B = kernel.A.double(), kernel.B.double()
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        Uk, Sk, Wkh = torch.linalg.svd(B @ (U * S), full_matrices=False)
        self.register_buffer("in_basis", Vh.t().float().contiguous())  # d_in_S x r
        self.register_buffer("out_basis", Uk.float().contiguous())  # d_out_S x r
        self.register_buffer("core", (Sk[:, None] * Wkh).float().contiguous())  # r x r
        self.scale = float(kernel.scale)
        self.source_key, self.target_key = kernel.key, target.key
        self.rank = kernel.rank
        self.source_rows = kernel.rows
        self.source_module = kernel.module_path
        self.p_in = make_head(head, target.d_in, self.rank)
        self.p_out = make_head(head, self.rank, target.d_out)
        self.record = False
        self.last_z: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.p_in(x)
        if self.record:  # kept for the MSE term, which compares z with in_basis^T x_S
            self.last_z = z
        return self.scale * self.p_out(z @ self.core.t().to(z.dtype))

    def added_to(self, y: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """y + forward(x), the delta written into `rows` of y's last dimension when given (a fused
        module's role). With linear heads the scale and the sum ride in the output
        head's matmul (one addmm): no full-size product to scale and then add, forward or backward; a
        fused role's output head is widened to the module's width with zero rows elsewhere (r columns)."""
        if not isinstance(self.p_out, LinearHead):
            d = self.forward(x).to(y.dtype)
            return y + d if rows is None else y.index_add(-1, rows, d)
        z = self.p_in(x)
        if self.record:
            self.last_z = z
        # the scale on the r x r core (a buffer: nothing to do in the backward), not on a full-size product
        h = (z @ (self.core.t() * self.scale).to(z.dtype)).to(y.dtype)
        w = self.p_out.weight
        if rows is not None:
            w = w.new_zeros(y.shape[-1], w.shape[1]).index_copy(0, rows, w)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), w.t().to(y.dtype))
        return out.view(y.shape)

    def source_delta(self, x_s: torch.Tensor) -> torch.Tensor:
        """What the source LoRA adds at the source site (for tests and CAST-0)."""
        return self.scale * ((x_s @ self.in_basis) @ self.core.t()) @ self.out_basis.t()

    @torch.no_grad()
    def set_identity(self) -> None:
        """Heads that reproduce the source LoRA exactly (source and target share the site's spaces)."""
        self.p_in.linear_part().copy_(self.in_basis.t())
        self.p_out.linear_part().copy_(self.out_basis)


class CastLinear(nn.Module):
    """Wraps a target Linear/Conv1D (`base_layer`) and adds the ported deltas."""

    def __init__(self, base_layer: nn.Module, ports: list[PortedKernel], rows: list[torch.Tensor | None]):
        super().__init__()
        self.base_layer = base_layer
        self.ports = nn.ModuleList(ports)
        self.rows = rows
        self.enabled = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        if not self.enabled:
            return y
        for port, rows in zip(self.ports, self.rows):
            y = port.added_to(y, x, rows)
        return y


@contextmanager
def attached(model: nn.Module, ports: list[tuple[PortedKernel, Site]]) -> Iterator[list[CastLinear]]:
    """Install CastLinear wrappers for `ports` on `model`; the original modules come back on exit."""
    by_path: dict[str, list[tuple[PortedKernel, Site]]] = {}
    for port, site in ports:
        by_path.setdefault(site.path, []).append((port, site))
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    wrappers = []
    try:
        for path, items in by_path.items():
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            original = getattr(parent, name)
            dev = execution_device(original)
            for port, _ in items:
                port.to(dev)
            # fused rows on the module's device once, not copied at every forward (a host-device sync there)
            rows = [None if s.rows is None else s.rows.to(dev) for _, s in items]
            wrapper = CastLinear(original, [p for p, _ in items], rows)
            setattr(parent, name, wrapper)
            swapped.append((parent, name, original))
            wrappers.append(wrapper)
        yield wrappers
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)


@contextmanager
def deltas_off(wrappers: list[CastLinear]) -> Iterator[None]:
    """Run the target as its own base model (for the delta teacher and controls)."""
    for w in wrappers:
        w.enabled = False
    try:
        yield
    finally:
        for w in wrappers:
            w.enabled = True
