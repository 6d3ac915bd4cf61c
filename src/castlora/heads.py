"""Projection heads and their closed-form (ridge) start.

Heads know only d_in and d_out. castlora's heads act on the *kernel's subspaces*: the source LoRA
`B A` reads only the r directions of A's row space and writes only the r directions of B's column
space, so `B A P_in` and `P_out B A` depend on P_in and P_out only through those r directions.
Parametrising P_in: d_in_T -> r and P_out: r -> d_out_T therefore gives exactly the same family of
ported deltas as full d_in_T -> d_in_S heads, with r * d parameters instead of d^2 (a 7B port
trains megabytes of heads, not gigabytes), and the ported delta stays a rank-r LoRA.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearHead(nn.Module):
    """y = W x (no bias: a bias would make the ported delta affine, which a LoRA cannot hold)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t().to(x.dtype)

    def linear_part(self) -> torch.Tensor:
        return self.weight


class MLPHead(nn.Module):
    """Residual MLP head: y = W x + W2 gelu(W1 x). W2 starts at zero, so it starts as LinearHead."""

    def __init__(self, d_in: int, d_out: int, hidden: int | None = None):
        super().__init__()
        # four times the narrow side, which is the kernel's rank r for both heads (d -> r in, r -> d out):
        # 4 x d_out made each 7B output head 4096 x 16384 wide, ~15B parameters over 224 kernels
        hidden = hidden or max(4 * min(d_in, d_out), 16)
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))
        self.w1 = nn.Parameter(torch.randn(hidden, d_in) / d_in ** 0.5)
        self.w2 = nn.Parameter(torch.zeros(d_out, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = torch.nn.functional.gelu(x @ self.w1.t().to(dt))
        return x @ self.weight.t().to(dt) + h @ self.w2.t().to(dt)

    def linear_part(self) -> torch.Tensor:
        return self.weight


HEADS = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, d_in: int, d_out: int) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head type {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](d_in, d_out)


def ridge(X: torch.Tensor, Y: torch.Tensor, lam: float = 1e-3) -> torch.Tensor:
    """W (d_y x d_x) minimising ||X W^T - Y||^2 + lam * mean(diag(X^T X)) * ||W||^2.

    The penalty is relative to the average feature energy, so one `lam` fits activations of any
    scale. Solved in float64 through the normal equations (d_x is a hidden size, n >> d_x).
    """
    X, Y = X.double(), Y.double()
    return ridge_from_stats(X.t() @ X, X.t() @ Y, lam)


def ridge_from_stats(gram: torch.Tensor, cross: torch.Tensor, lam: float) -> torch.Tensor:
    """`ridge` from X^T X and X^T Y alone (statistics accumulated batch by batch)."""
    reg = lam * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), cross).t()


def residual_from_stats(P: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, yy: float) -> float:
    """||Y - X P^T||^2 from X^T X, X^T Y and ||Y||^2: ||Y||^2 - 2 <P, (X^T Y)^T> + <P X^T X, P>."""
    return yy - 2 * float((P * cross.t()).sum()) + float(((P @ gram) * P).sum())


def reduced_rank_fit(X: torch.Tensor, D: torch.Tensor, rank: int, lam: float = 1e-3):
    """Best rank-`rank` linear map with D ~= X A^T B^T (reduced-rank ridge regression).

    Returns (A: rank x d_x, B: d_d x rank, relative error ||D - X A^T B^T||^2 / ||D||^2).
    Used to export non-linear heads as a LoRA.
    """
    X, D = X.double(), D.double()
    return reduced_rank_from_stats(X.t() @ X, X.t() @ D, float(D.pow(2).sum()), rank, lam)


def reduced_rank_from_stats(gram: torch.Tensor, cross: torch.Tensor, dd: float, rank: int, lam: float = 1e-3):
    """reduced_rank_fit from X^T X, X^T D and ||D||^2 alone, so the positions can be streamed batch by
    batch: the ridge map L (as `ridge`), then its fitted outputs X L^T kept in their top `rank`
    directions, the top eigenvectors of their Gram L X^T X L^T."""
    gram, cross = gram.double(), cross.double()
    L = ridge_from_stats(gram, cross, lam)
    _, vecs = torch.linalg.eigh(L @ gram @ L.t())
    B = vecs[:, -rank:].flip(-1)  # d_d x rank, the strongest direction first
    A = B.t() @ L
    err = residual_from_stats(B @ A, gram, cross, dd) / max(dd, 1e-30)
    return A.float(), B.float(), max(err, 0.0)
