"""Tests for castlora.tokens on the real zoo tokenizers and real text (offline, a few seconds)."""
from __future__ import annotations

import gzip
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from castlora.tokens import PairBatch, align_offsets, alignment_stats, encode_pair, shared_vocab
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from castlora.tokens import PairBatch, align_offsets, alignment_stats, encode_pair, shared_vocab

SHARED = Path(os.environ.get("CASTLORA_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
NAMES = ("llama", "mistral", "neox")
PAIRS = [("llama", "mistral"), ("mistral", "llama"), ("llama", "neox"), ("neox", "llama"), ("mistral", "neox"), ("neox", "mistral")]

# Non-ASCII text that forces byte fallback (emoji, CJK), byte-level splits inside characters,
# combining marks, zero-width joiners, odd whitespace, and text starting with a non-letter.
UNICODE_TEXTS = [
    "Café naïve résumé — “quoted” déjà vu, Ærø and Øresund.",
    "😀 starts with an emoji, then 👩\u200d👩\u200d👧 a family and 🇫🇷 a flag.",
    "日本語のテキスト: 東京は日本の首都です。中文也可以。한국어도.",
    "e\u0301 (combining) vs é; α β γ ≥ ∑ ∞ ƒ Ψ ω; non\xa0breaking\xa0space.",
    "\n\n  leading whitespace\tand\t\ttabs   and trailing spaces   ",
    "x " + "😀" * 12 + " end",
    " starts with a space: the dummy-prefix piece of llama must not pair with a space.",
]
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")


def _docs(rel: str) -> list[str]:
    path = SHARED / "data" / rel
    if not path.exists():
        pytest.skip(f"{path} not found (set CASTLORA_SHARED)")
    return [d for d in gzip.open(path, "rt", encoding="utf-8").read().split("\n\n\n") if d.strip()]


@pytest.fixture(scope="module")
def toks() -> dict:
    from transformers import AutoTokenizer

    if not all((SHARED / "zoo" / n / "tokenizer.json").exists() for n in NAMES):
        pytest.skip(f"zoo tokenizers not found under {SHARED} (set CASTLORA_SHARED)")
    return {n: AutoTokenizer.from_pretrained(SHARED / "zoo" / n) for n in NAMES}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    general = [d for d in _docs("general/valid.txt.gz") if len(d) > 400][:12]
    domains = _docs("domains/shakespeare/test.txt.gz")[:4] + _docs("domains/kjv/test.txt.gz")[:4]
    return [d[:1500] for d in general + domains] + UNICODE_TEXTS


def _covered(tok, ids: list[int]) -> list[str] | None:
    """The text each token prefix ``ids[: i + 1]`` has read, rebuilt without decode's heuristics.

    SentencePiece: join the pieces (``▁`` = space, ``<0xNN>`` = byte) and drop exactly one leading
    space, the dummy prefix. ``decode`` instead strips a leading space only if there is one, which
    would hide a dummy-prefix piece paired as if it had read a real space. Byte-level BPE: decode is
    exact, so this returns None and the caller uses decode. Prefixes ending inside a multi-byte
    character come back with U+FFFD.
    """
    pieces = tok.convert_ids_to_tokens(ids)
    special = set(tok.all_special_ids)
    if not any("\u2581" in p for p in tok.convert_ids_to_tokens(tok("a b")["input_ids"])):
        return None
    out, acc = [], b""
    for i, p in zip(ids, pieces):
        if i not in special:
            m = _BYTE_PIECE.fullmatch(p)
            acc += bytes([int(m.group(1), 16)]) if m else p.replace("\u2581", " ").encode()
        assert acc[:1] in (b"", b" ")
        out.append(acc[1:].decode("utf-8", errors="replace"))
    return out


def _row(pb: PairBatch, b: int) -> tuple[list[int], list[int], list[int], list[int]]:
    m = pb.pos_mask[b]
    return (pb.ids_s[b][pb.mask_s[b].bool()].tolist(), pb.ids_t[b][pb.mask_t[b].bool()].tolist(),
            pb.pos_s[b][m].tolist(), pb.pos_t[b][m].tolist())


@pytest.mark.parametrize("src,tgt", PAIRS)
def test_aligned_positions_have_read_the_same_prefix(toks, texts, src, tgt):
    ts, tt = toks[src], toks[tgt]
    pb = encode_pair(texts, ts, tt, max_length=512)
    n_unicode_pairs = 0
    for b, text in enumerate(texts):
        ids_s, ids_t, ps, pt = _row(pb, b)
        off_s = np.array(ts(text, return_offsets_mapping=True)["offset_mapping"])
        off_t = np.array(tt(text, return_offsets_mapping=True)["offset_mapping"])
        if text not in UNICODE_TEXTS:  # real text: most tokens align (emoji cost 4 tokens a boundary)
            assert len(ps) > 0.6 * len(ids_s), (src, tgt, text[:60])
        assert ps == sorted(set(ps)) and pt == sorted(set(pt))
        cov_s, cov_t = _covered(ts, ids_s), _covered(tt, ids_t)
        for i, j in zip(ps, pt):
            end = off_s[i, 1]
            assert end == off_t[j, 1] and end > 0
            ds = ts.decode(ids_s[: i + 1], skip_special_tokens=True)
            dt = tt.decode(ids_t[: j + 1], skip_special_tokens=True)
            # SentencePiece decode strips the dummy-prefix space, so compare modulo leading spaces ...
            assert ds.lstrip(" ") == dt.lstrip(" ") == text[:end].lstrip(" "), (src, tgt, i, j)
            # ... and exactly, from the pieces themselves (this also fails inside a multi-byte char).
            exact_s, exact_t = ds if cov_s is None else cov_s[i], dt if cov_t is None else cov_t[j]
            assert exact_s == exact_t == text[:end], (src, tgt, i, j)
        n_unicode_pairs += len(ps) if text in UNICODE_TEXTS else 0
    assert n_unicode_pairs > 60


def test_byte_fallback_pieces_pair_only_at_the_last_byte(toks):
    llama, neox = toks["llama"], toks["neox"]
    text = "Café 😀 日本"
    pb = encode_pair([text], llama, neox, max_length=64)
    ids_s, ids_t, ps, pt = _row(pb, 0)
    pieces = llama.convert_ids_to_tokens(ids_s)
    first_emoji_byte = pieces.index("<0xF0>")
    assert pieces[first_emoji_byte : first_emoji_byte + 4] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert not {first_emoji_byte, first_emoji_byte + 1, first_emoji_byte + 2} & set(ps)
    j = pt[ps.index(first_emoji_byte + 3)]  # the emoji completes on both sides at the same time
    assert neox.decode(ids_t[: j + 1]) == "Café 😀"
    assert pieces[0] == "<s>" and 0 not in ps  # BOS stays in the ids but never pairs
    # llama ends tokens after C|afé|␣|😀|␣|日|本, GPT-2 after C|af|é|␣😀|␣日|本: five common prefixes.
    assert [neox.decode(ids_t[: j + 1]) for j in pt] == ["C", "Café", "Café 😀", "Café 😀 日", "Café 😀 日本"]


def test_align_offsets_synthetic():
    # Source: BOS, two byte pieces of one char, then a token; target: three tokens.
    ps, pt = align_offsets(np.array([[0, 0], [0, 1], [0, 1], [1, 3]]), np.array([[0, 1], [1, 2], [2, 3]]),
                           np.array([True, False, False, False]), np.zeros(3, bool))
    assert ps.tolist() == [2, 3] and pt.tolist() == [0, 2] and ps.dtype == np.int64
    # A SentencePiece dummy-prefix piece overlapping the next token (3,4)+(3,7) is not a boundary.
    ps, pt = align_offsets(np.array([[0, 3], [3, 4], [3, 7]]), np.array([[0, 3], [3, 4], [4, 7]]),
                           np.zeros(3, bool), np.zeros(3, bool))
    assert ps.tolist() == [0, 2] and pt.tolist() == [0, 2]
    # length_* keep only earlier positions but judge the last one with the token beyond it.
    ps, pt = align_offsets(np.array([[0, 1], [0, 1], [1, 2]]), np.array([[0, 1], [1, 2]]),
                           np.zeros(3, bool), np.zeros(2, bool), length_s=1)
    assert ps.size == 0 and pt.size == 0


def test_same_tokenizer_pairs_every_position(toks, texts):
    for name in ("llama", "neox"):
        pb = encode_pair(texts, toks[name], toks[name], max_length=256)
        assert torch.equal(pb.ids_s, pb.ids_t) and torch.equal(pb.mask_s, pb.mask_t)
        lengths = pb.mask_s.sum(1)
        assert torch.equal(pb.pos_mask.sum(1), lengths)  # BOS included
        assert torch.equal(pb.pos_s, pb.pos_t)
        assert torch.equal(pb.pos_s[0, : lengths[0]], torch.arange(int(lengths[0])))
        stats = alignment_stats(texts, toks[name], toks[name], max_length=256)
        assert stats["aligned_fraction_s"] == stats["aligned_fraction_t"] == 1.0


def test_padding_and_truncation(toks):
    llama, neox = toks["llama"], toks["neox"]
    batch = ["", "Hi.", "A somewhat longer sentence, with several words in it.", "x " + "😀" * 40]
    pb = encode_pair(batch, llama, neox, max_length=6, max_length_t=20)
    assert pb.ids_s.shape == (4, 6) and pb.ids_t.shape == (4, 20)
    len_s = [min(len(llama(t)["input_ids"]), 6) for t in batch]
    len_t = [min(len(neox(t)["input_ids"]), 20) for t in batch]
    assert pb.mask_s.sum(1).tolist() == len_s and pb.mask_t.sum(1).tolist() == len_t
    assert len_t[0] == 0 and len_s[0] == 1  # empty text: just BOS for llama, nothing for GPT-2
    assert (pb.ids_s[pb.mask_s == 0] == llama.eos_token_id).all()  # no pad token: EOS pads
    assert (pb.ids_t[pb.mask_t == 0] == neox.eos_token_id).all()
    assert pb.pos_mask[0].sum() == 0 and pb.pos_mask[1].sum() == 2  # "Hi", "."
    for b in range(4):
        m = pb.pos_mask[b]
        assert (pb.pos_s[b][m] < len_s[b]).all() and (pb.pos_t[b][m] < len_t[b]).all()
        assert (pb.pos_s[b][~m] == 0).all() and (pb.pos_t[b][~m] == 0).all()
        assert m.sum() == 0 or bool(m[: int(m.sum())].all())  # real pairs first, then padding
        # truncation only removes pairs: the rest equals the untruncated alignment
        full = encode_pair([batch[b]], llama, neox, max_length=512)
        keep = (full.pos_s[0] < len_s[b]) & (full.pos_t[0] < len_t[b]) & full.pos_mask[0]
        assert full.pos_s[0][keep].tolist() == pb.pos_s[b][m].tolist()
    # "x 😀...": llama keeps <s> ▁x ▁ F0 9F 98. GPT-2's "Ģ" ends 😀 at char 3 like llama's cut 98 piece,
    # but the 98 piece does not complete the emoji (the dropped 80 piece does): only "x" pairs.
    assert pb.pos_s[3][pb.pos_mask[3]].tolist() == [1]
    assert pb.num_aligned == int(pb.pos_mask.sum()) == 0 + 2 + 1 + int(pb.pos_mask[2].sum())
    moved = pb.to("cpu")
    assert isinstance(moved, PairBatch) and torch.equal(moved.pos_s, pb.pos_s)
    assert torch.equal(moved.sel_t, pb.sel_t) and moved.num_aligned == pb.num_aligned  # the indices travel along
    # gather by the precomputed indices == gather by the boolean mask, pair by pair and in the same order
    for side, pos, width in (("s", pb.pos_s, pb.ids_s.shape[1]), ("t", pb.pos_t, pb.ids_t.shape[1])):
        x = torch.randn(4, width, 3)
        rows = torch.arange(4)[:, None].expand_as(pos)
        assert torch.equal(pb.gather(x, side), x[rows[pb.pos_mask], pos[pb.pos_mask]])


def test_shared_vocab(toks):
    llama, mistral, neox = toks["llama"], toks["mistral"], toks["neox"]
    lm = shared_vocab(llama, mistral)
    assert lm.size > 20_000 and lm.ids_s.dtype == torch.long
    ln = shared_vocab(llama, neox)
    assert ln.size > 15_000
    for sv, ts, tt in ((lm, llama, mistral), (ln, llama, neox), (shared_vocab(neox, mistral), neox, mistral)):
        pairs = dict(zip(sv.ids_s.tolist(), sv.ids_t.tolist()))
        assert sv.ids_s.tolist() == sorted(pairs) and len(set(pairs.values())) == sv.size
        assert pairs[ts.eos_token_id] == tt.eos_token_id
        assert ts.bos_token_id not in pairs or ts.bos_token_id == ts.eos_token_id
        # Decode after a common prefix token, so SentencePiece keeps the leading space.
        a_s, a_t = ts.convert_tokens_to_ids("a"), tt.convert_tokens_to_ids("a")
        ids_s, ids_t = [i for i in pairs if i != ts.eos_token_id], [pairs[i] for i in pairs if i != ts.eos_token_id]
        dec_s = [d[1:] for d in ts.batch_decode([[a_s, i] for i in ids_s])]
        dec_t = [d[1:] for d in tt.batch_decode([[a_t, j] for j in ids_t])]
        n_checked = 0
        for i, j, ds, dt in zip(ids_s, ids_t, dec_s, dec_t):
            if "\ufffd" in ds + dt:  # a lone byte of a multi-byte character
                continue
            assert ds == dt, (ts.convert_ids_to_tokens(i), tt.convert_ids_to_tokens(j))
            n_checked += 1
        assert n_checked > sv.size - 200
    the_l, the_n = llama.convert_tokens_to_ids("▁the"), neox.convert_tokens_to_ids("Ġthe")
    assert dict(zip(ln.ids_s.tolist(), ln.ids_t.tolist()))[the_l] == the_n
    the_m = mistral.convert_tokens_to_ids("▁the")
    assert dict(zip(lm.ids_s.tolist(), lm.ids_t.tolist()))[the_l] == the_m
    # Same bytes twice in llama ("<0x65>" and "e", "<0x20>" and "▁"): the piece the tokenizer emits wins.
    ln_pairs = dict(zip(ln.ids_s.tolist(), ln.ids_t.tolist()))
    assert ln_pairs[llama.convert_tokens_to_ids("e")] == neox.convert_tokens_to_ids("e")
    assert ln_pairs[llama.convert_tokens_to_ids("▁")] == neox.convert_tokens_to_ids("Ġ")
    assert llama.convert_tokens_to_ids("<0x65>") not in ln_pairs and llama.convert_tokens_to_ids("<0x20>") not in ln_pairs
    # Newline is a byte-fallback piece in llama and "Ċ" in GPT-2.
    assert dict(zip(ln.ids_s.tolist(), ln.ids_t.tolist()))[llama.convert_tokens_to_ids("<0x0A>")] == \
        neox.convert_tokens_to_ids("Ċ")
    same = shared_vocab(llama, llama)
    assert same.size == len(llama.get_vocab()) and torch.equal(same.ids_s, same.ids_t)


def test_alignment_stats_on_real_text(toks):
    docs = _docs("general/valid.txt.gz")[:100]
    st = alignment_stats(docs, toks["llama"], toks["neox"], max_length=256)
    assert st["num_texts"] == 100 and st["tokens_s"] > 3000 and st["tokens_t"] > 3000
    assert 0.8 < st["aligned_fraction_s"] < 1.0 and 0.8 < st["aligned_fraction_t"] < 1.0
    sm = alignment_stats(docs, toks["llama"], toks["mistral"], max_length=256)
    assert sm["aligned_fraction_s"] > st["aligned_fraction_s"]  # SentencePiece pair agrees more
