"""Model families as data.

A `FamilySpec` says, for one Hugging Face architecture, where the decoder layers live and which
module inside a layer computes each canonical *role* (attention q/k/v/o, mlp gate/up/down, norms).
Fused projections (GPT-NeoX `query_key_value`, GPT-2 `c_attn`, Phi-3 `qkv_proj`/`gate_up_proj`)
are recorded as a `Fused` layout: which rows of the fused output belong to which role. GPT-2's
Conv1D stores its weight transposed; that is recorded too. Nothing outside `castlora.families`
looks at `model_type`: everything else asks a resolved `Site`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# The canonical roles a LoRA can adapt, in the order castlora reports them.
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

# Which space each role reads from and writes to. Roles that read the same space can share
# an input alignment; a role the target lacks may stand in for one that reads/writes alike.
ROLE_READS = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
              "gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}
ROLE_WRITES = {"q": "q", "k": "k", "v": "v", "o": "resid",
               "gate": "mlp_hidden", "up": "mlp_hidden", "down": "resid"}

# A role the target family lacks maps to its nearest counterpart: the role that reads the same
# space and writes the same kind of space (GPT-NeoX has no gated MLP: gate -> up).
ROLE_COUNTERPARTS = {"gate": "up"}


@dataclass(frozen=True)
class Fused:
    """Layout of a fused projection's output rows.

    parts: the roles stacked in the fused output, in order.
    sizes: "equal" (each part is out_features / len(parts)) or "attention" (q has
        num_heads * head_dim rows, k and v num_kv_heads * head_dim each: GQA-aware).
    per_head: True when the parts are interleaved per attention head (GPT-NeoX:
        output viewed as [..., heads, parts * head_dim]), False when they are contiguous blocks.
    """

    parts: tuple[str, ...]
    sizes: str = "equal"
    per_head: bool = False

    def rows(self, role: str, out_features: int, config) -> torch.Tensor:
        """Indices of the fused output rows that compute `role`."""
        if role not in self.parts:
            raise KeyError(f"role {role!r} is not part of fused layout {self.parts}")
        if self.per_head:
            head_dim = head_dim_of(config)
            n_heads = out_features // (len(self.parts) * head_dim)
            k = self.parts.index(role)
            base = torch.arange(n_heads)[:, None] * len(self.parts) * head_dim
            return (base + k * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        if self.sizes == "attention":
            hd = head_dim_of(config)
            n_q = config.num_attention_heads * hd
            n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            sizes = {"q": n_q, "k": n_kv * hd, "v": n_kv * hd}
            widths = [sizes[p] for p in self.parts]
        else:
            widths = [out_features // len(self.parts)] * len(self.parts)
        if sum(widths) != out_features:
            raise ValueError(f"fused layout {self.parts} ({widths}) does not cover {out_features} rows")
        start = sum(widths[: self.parts.index(role)])
        return torch.arange(start, start + widths[self.parts.index(role)])


@dataclass(frozen=True)
class SiteSpec:
    """Where a role lives inside one decoder layer."""

    path: str  # relative to the layer module, e.g. "self_attn.q_proj"
    fused: Fused | None = None


@dataclass(frozen=True)
class FamilySpec:
    """Everything castlora needs to know about one architecture family."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # path of the ModuleList of decoder layers
    embed: str
    final_norm: str
    sites: dict[str, SiteSpec]  # role -> where it lives in a layer
    norms: dict[str, str] = field(default_factory=dict)  # "attn", "mlp" -> path in a layer
    transposed: bool = False  # weights stored (in, out), like GPT-2's Conv1D
    notes: str = ""

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ROLES if r in self.sites)


@dataclass(frozen=True)
class Site:
    """One resolved (layer, role) of a concrete model."""

    layer: int
    role: str
    path: str  # full module path in the model
    d_in: int
    d_out: int  # rows of this role (a slice of the module output when fused)
    module_out: int  # the whole module's output size
    rows: torch.Tensor | None  # indices into the module output when fused, else None
    transposed: bool

    @property
    def fused(self) -> bool:
        return self.rows is not None

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.role}"


def head_dim_of(config) -> int:
    hd = getattr(config, "head_dim", None)
    if isinstance(hd, int) and hd > 0:
        return hd
    return config.hidden_size // config.num_attention_heads


def linear_shape(module: nn.Module, transposed: bool) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D-style module."""
    w = getattr(module, "weight", None)
    if w is None:
        # a peft LoRA layer wraps the original as base_layer
        base = getattr(module, "base_layer", None)
        if base is None:
            raise TypeError(f"{type(module).__name__} has no weight")
        return linear_shape(base, transposed)
    d0, d1 = w.shape
    return (d0, d1) if transposed else (d1, d0)
