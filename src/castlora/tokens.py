"""Token-level correspondence between two tokenizers.

CAST ports an adapter by matching activations of a source and a target model on the same text.
The two models tokenize differently, so activations can only be compared at positions where both
models have read exactly the same prefix of the text ("common boundaries"), and output
distributions can only be compared on tokens both vocabularies share. This module computes both:

* :func:`shared_vocab` pairs token ids that denote the same byte string;
* :func:`align_offsets` / :func:`encode_pair` pair token positions that end at the same character.

Everything is precomputed per text with numpy; the training loop only indexes tensors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

__all__ = ["SharedVocab", "PairBatch", "shared_vocab", "align_offsets", "encode_pair", "alignment_stats"]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> raw byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):  # bytes without a printable form are shifted to 256+
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_U2B = _gpt2_unicode_to_byte()


def _has_type(node: Any, name: str) -> bool:
    """True if a tokenizers JSON component (possibly a nested Sequence) contains type ``name``."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def _special_ids(tok: Any) -> np.ndarray:
    """All special ids plus every added token: none of them stands for text the other side can see."""
    ids = set(tok.all_special_ids) | set(getattr(tok, "added_tokens_decoder", {}) or {})
    return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)


def _piece_bytes(tok: Any) -> dict[bytes, int]:
    """Map normalised byte string -> token id for the non-special pieces of ``tok``'s vocabulary.

    Duplicates (e.g. Llama's ``<0x20>`` and ``▁``) keep the regular piece over the byte-fallback
    piece, because only the regular one is ever emitted by the tokenizer (the byte piece's
    embedding is practically untrained); among pieces of the same kind the lower id wins.
    """
    spec = json.loads(tok.backend_tokenizer.to_str())
    byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"), "ByteLevel")
    byte_fallback = bool(spec.get("model", {}).get("byte_fallback")) or _has_type(spec.get("decoder"), "ByteFallback")
    special = set(_special_ids(tok).tolist())
    best: dict[bytes, tuple[int, int]] = {}  # bytes -> (is_byte_piece, id); smaller tuple wins
    for piece, i in tok.get_vocab().items():  # once per tokenizer pair, not per training step
        if i in special:
            continue
        m = _BYTE_PIECE.match(piece) if byte_fallback else None
        if m:
            b, rank = bytes([int(m.group(1), 16)]), 1
        elif byte_level:
            if any(c not in _U2B for c in piece):
                continue  # not a byte-level piece: cannot say which bytes it denotes
            b, rank = bytes(_U2B[c] for c in piece), 0
        else:  # SentencePiece: the meta-symbol stands for a space
            b, rank = piece.replace("\u2581", " ").encode("utf-8"), 0
        if b and (b not in best or (rank, i) < best[b]):
            best[b] = (rank, i)
    return {b: i for b, (_, i) in best.items()}


@dataclass(frozen=True)
class SharedVocab:
    """Pairs ``(ids_s[k], ids_t[k])`` of token ids denoting the same bytes, sorted by ``ids_s``."""

    ids_s: torch.Tensor
    ids_t: torch.Tensor

    @property
    def size(self) -> int:
        """Number of id pairs."""
        return int(self.ids_s.numel())


def shared_vocab(tok_s: Any, tok_t: Any) -> SharedVocab:
    """Token ids of ``tok_s`` and ``tok_t`` that denote the same byte string (plus EOS <-> EOS)."""
    vs, vt = tok_s.get_vocab(), tok_t.get_vocab()
    if vs == vt:  # same vocabulary: identity, special tokens included
        ids = torch.tensor(sorted(vs.values()), dtype=torch.long)
        return SharedVocab(ids, ids.clone())
    bs, bt = _piece_bytes(tok_s), _piece_bytes(tok_t)
    pairs = {bs[b]: bt[b] for b in bs.keys() & bt.keys()}
    if tok_s.eos_token_id is not None and tok_t.eos_token_id is not None:
        pairs[tok_s.eos_token_id] = tok_t.eos_token_id  # both mean "end of document"
    ks = sorted(pairs)
    return SharedVocab(torch.tensor(ks, dtype=torch.long), torch.tensor([pairs[k] for k in ks], dtype=torch.long))


def _boundaries(offsets: np.ndarray, special: np.ndarray, length: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Positions (< length) after which the token sequence has read exactly ``text[:end]``, and those ends.

    A token qualifies only if the next non-special token starts at or after its end: this drops
    all but the last byte-fallback / byte-level piece of a multi-byte character (they share the
    character's offsets) and a SentencePiece dummy-prefix ``▁`` whose offsets overlap the next
    token's (Llama-2 encodes " the" as ``▁`` (0,1) + ``▁the`` (0,4): the first piece has read no
    text). It is why the caller should pass one token beyond the truncation length.
    """
    pos = np.flatnonzero(~np.asarray(special, dtype=bool))
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)[pos]
    if pos.size == 0:
        return pos, off[:, 1]
    ok = np.append(off[:-1, 1] <= off[1:, 0], True) & (off[:, 1] > 0)
    pos, end = pos[ok], off[ok, 1]
    last = np.append(end[:-1] != end[1:], True)  # equal ends (zero-length pieces): keep the last
    pos, end = pos[last], end[last]
    if length is not None:
        pos, end = pos[pos < length], end[pos < length]
    return pos, end


def align_offsets(
    offsets_s: np.ndarray, offsets_t: np.ndarray, special_s: np.ndarray, special_t: np.ndarray,
    length_s: int | None = None, length_t: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of positions ``(pos_s, pos_t)`` where both tokenizations end a token at the same character.

    ``offsets_*`` are ``(L, 2)`` character offsets, ``special_*`` boolean masks of tokens that never
    pair. ``length_*`` keep only positions below them (truncation) while still using the tokens
    beyond to judge whether the last kept token completes a character. Returns increasing int64 arrays.
    """
    ps, es = _boundaries(offsets_s, special_s, length_s)
    pt, et = _boundaries(offsets_t, special_t, length_t)
    _, i_s, i_t = np.intersect1d(es, et, assume_unique=True, return_indices=True)
    order = np.argsort(ps[i_s], kind="stable")
    return ps[i_s][order].astype(np.int64), pt[i_t][order].astype(np.int64)


@dataclass(frozen=True)
class PairBatch:
    """A batch of texts encoded by both tokenizers, right-padded, with aligned position pairs."""

    ids_s: torch.Tensor  # (B, Ls) long
    mask_s: torch.Tensor  # (B, Ls) long, 1 = real token
    ids_t: torch.Tensor  # (B, Lt)
    mask_t: torch.Tensor  # (B, Lt)
    pos_s: torch.Tensor  # (B, P) long, 0 where pos_mask is False
    pos_t: torch.Tensor  # (B, P)
    pos_mask: torch.Tensor  # (B, P) bool
    # The aligned pairs as integer indices, N each: the row, the source position, the target position.
    # Computed once where the batch is built (on the CPU) and moved with it, so that gathering them costs
    # no host-device sync: a boolean-mask index is a nonzero(), a sync, and a step gathers once per kernel.
    sel_b: torch.Tensor | None = None
    sel_s: torch.Tensor | None = None
    sel_t: torch.Tensor | None = None

    def __post_init__(self):
        if self.sel_b is None:
            b, p = self.pos_mask.nonzero(as_tuple=True)  # row-major: the order boolean indexing gives
            for name, value in (("sel_b", b), ("sel_s", self.pos_s[b, p]), ("sel_t", self.pos_t[b, p])):
                object.__setattr__(self, name, value)  # the dataclass is frozen

    @property
    def num_aligned(self) -> int:
        """Total number of aligned position pairs in the batch."""
        return self.sel_b.numel()

    def gather(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """Rows of x (B x L x ...) at the aligned positions of `side` ("s": source, "t": target) -> (N x ...),
        the i-th row of either side belonging to the same aligned pair."""
        pos = {"s": self.sel_s, "t": self.sel_t}[side]
        rows = self.sel_b
        if rows.device != x.device:  # sharded models: x may live on any device
            rows, pos = rows.to(x.device), pos.to(x.device)
        return x[rows, pos]  # integer advanced indexing: no (B, P, d) index tensor, no sync

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two (B, Lt) bool masks over the target's positions p (each predicts token p + 1): where
        there is a real next token, and which of those are aligned (both models have read the same
        prefix there). The rest, inside a word the target splits and the source does not, get no
        teacher."""
        real = torch.zeros_like(self.mask_t, dtype=torch.bool)
        real[:, :-1] = self.mask_t[:, 1:].bool()
        aligned = torch.zeros_like(real)
        aligned[self.sel_b, self.sel_t] = True
        return real, aligned & real

    def to(self, device: torch.device | str) -> "PairBatch":
        """A copy with every tensor on ``device``."""
        return PairBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _encode(texts: list[str], tok: Any, max_length: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    # One token beyond max_length so that _boundaries can judge the last kept token.
    enc = tok(texts, return_offsets_mapping=True, truncation=True, max_length=max_length + 1)
    return ([np.asarray(x, dtype=np.int64) for x in enc["input_ids"]],
            [np.asarray(o, dtype=np.int64).reshape(-1, 2) for o in enc["offset_mapping"]])


def _pad(rows: list[np.ndarray], pad: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [0]) if width is None else width
    out = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)], mask[b, : len(r)] = r, 1
    return torch.from_numpy(out), torch.from_numpy(mask)


def _pad_id(tok: Any) -> int:
    return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)


def encode_pair(texts: list[str], tok_s: Any, tok_t: Any, max_length: int, max_length_t: int | None = None) -> PairBatch:
    """Tokenize ``texts`` with both tokenizers (special tokens such as BOS included, truncated to
    ``max_length`` / ``max_length_t``) and pair the positions where both have read the same prefix.

    Special tokens never pair, except when both sides produce the same ids and offsets (same
    tokenizer on both sides): then every real position pairs, BOS included.
    """
    max_length_t = max_length if max_length_t is None else max_length_t
    ids_s, off_s = _encode(texts, tok_s, max_length)
    ids_t, off_t = _encode(texts, tok_t, max_length_t)
    sp_s, sp_t = _special_ids(tok_s), _special_ids(tok_t)
    rows_s, rows_t, pairs_s, pairs_t = [], [], [], []
    for a, b, oa, ob in zip(ids_s, ids_t, off_s, off_t):
        ls, lt = min(len(a), max_length), min(len(b), max_length_t)
        n = min(len(a), len(b))
        if np.array_equal(a[:n], b[:n]) and np.array_equal(oa[:n], ob[:n]):
            ps = pt = np.arange(min(ls, lt), dtype=np.int64)  # identical tokenization: everything pairs
        else:
            ps, pt = align_offsets(oa, ob, np.isin(a, sp_s), np.isin(b, sp_t), ls, lt)
        rows_s.append(a[:ls]), rows_t.append(b[:lt]), pairs_s.append(ps), pairs_t.append(pt)
    t_ids_s, t_mask_s = _pad(rows_s, _pad_id(tok_s))
    t_ids_t, t_mask_t = _pad(rows_t, _pad_id(tok_t))
    p_s, p_mask = _pad(pairs_s, 0)
    p_t, _ = _pad(pairs_t, 0, p_s.shape[1])
    return PairBatch(t_ids_s, t_mask_s, t_ids_t, t_mask_t, p_s, p_t, p_mask.bool())


def alignment_stats(texts: list[str], tok_s: Any, tok_t: Any, max_length: int, batch_size: int = 64) -> dict[str, float]:
    """How much of each side's (non-special) token stream lands on a common boundary."""
    n_pairs = n_s = n_t = pair_s = pair_t = 0
    sp_s, sp_t = torch.from_numpy(_special_ids(tok_s)), torch.from_numpy(_special_ids(tok_t))
    for i in range(0, len(texts), batch_size):
        pb = encode_pair(texts[i : i + batch_size], tok_s, tok_t, max_length)
        real_s = pb.mask_s.bool() & ~torch.isin(pb.ids_s, sp_s)
        real_t = pb.mask_t.bool() & ~torch.isin(pb.ids_t, sp_t)
        n_s, n_t, n_pairs = n_s + int(real_s.sum()), n_t + int(real_t.sum()), n_pairs + pb.num_aligned
        # Count only pairs on non-special tokens, so identical tokenizers give exactly 1.0.
        pair_s += int((real_s.gather(1, pb.pos_s) & pb.pos_mask).sum())
        pair_t += int((real_t.gather(1, pb.pos_t) & pb.pos_mask).sum())
    return {
        "aligned_fraction_s": pair_s / max(n_s, 1), "aligned_fraction_t": pair_t / max(n_t, 1),
        "num_aligned": n_pairs, "tokens_s": n_s, "tokens_t": n_t, "num_texts": len(texts),
    }
