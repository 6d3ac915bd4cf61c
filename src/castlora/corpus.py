"""Text in: corpus files (or a `datasets` name) -> documents -> fixed-size text chunks.

Chunks are cut by the *source* tokenizer (seq_len tokens each) and kept as text, because both
models must read the same characters; each side then tokenizes the chunk itself (tokens.py pairs
the positions). The chunk order is a pure function of the seed, so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

from .errors import CorpusError

DOC_SEPARATOR = "\n\n\n"  # shared/data convention: documents are separated by two blank lines


def _read_text(path: Path) -> str:
    try:
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise CorpusError(f"corpus file {path} cannot be read: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                          "convert it to UTF-8 first") from e


def read_documents(path: str | Path, prompts_only: bool = False) -> list[str]:
    """Documents of one .txt / .txt.gz (split on blank-line pairs) or .jsonl (`text` field) file.

    `prompts_only`: a .jsonl record's `prompt` field alone (its `completion`, if any, is never read),
    else its `text`: the unlabelled task prompts of `--prompts`."""
    path = Path(path)
    text = _read_text(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{n} is not a JSON line: {e}") from e
            if prompts_only:
                if "prompt" not in rec and "text" not in rec:
                    raise CorpusError(f"{path}:{n} has neither a 'prompt' nor a 'text' field")
                docs.append(str(rec["prompt"] if "prompt" in rec else rec["text"]))
            elif "text" in rec:
                docs.append(str(rec["text"]))
            elif "prompt" in rec and "completion" in rec:
                docs.append(str(rec["prompt"]) + str(rec["completion"]))
            else:
                raise CorpusError(f"{path}:{n} has neither a 'text' field nor 'prompt'/'completion'")
        return [d for d in docs if d.strip()]
    return [d for d in text.split(DOC_SEPARATOR) if d.strip()]


def _load_dataset_docs(name: str, limit: int) -> list[str]:
    try:
        import datasets  # optional: only for hub corpora on a machine with a network
    except ImportError:
        raise CorpusError(f"corpus {name!r} is not a file, and the `datasets` package is not installed "
                          "to load it as a dataset name (pip install 'castlora[data]')") from None
    ds_name, _, config = name.partition(":")
    ds = datasets.load_dataset(ds_name, config or None, split="train", streaming=True)
    return [str(row["text"]) for _, row in zip(range(limit), ds) if str(row.get("text", "")).strip()]


def read_corpus(paths: list[str] | str, dataset_limit: int = 50_000) -> list[str]:
    """All documents of the given files (or `datasets` names, as `name` or `name:config`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise CorpusError("no corpus given: pass one or more .txt, .txt.gz or .jsonl files")
    docs: list[str] = []
    for p in paths:
        path = Path(p)
        if path.exists():
            if path.is_dir():
                raise CorpusError(f"corpus path {path} is a folder; pass the text files inside it")
            docs.extend(read_documents(path))
        elif looks_like_file(str(p)):
            raise CorpusError(f"corpus file {path} does not exist")
        else:
            docs.extend(_load_dataset_docs(str(p), dataset_limit))
    if not docs:
        raise CorpusError(f"the corpus {', '.join(map(str, paths))} holds no text (0 non-empty documents)")
    return docs


def read_prompts(paths: list[str]) -> list[str]:
    """The unlabelled task prompts of `--prompts`: files only (.txt/.txt.gz documents, or .jsonl `prompt` or
    `text` fields), never a dataset name, and never an answer."""
    prompts: list[str] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CorpusError(f"prompts file {path} does not exist (--prompts takes .txt, .txt.gz or .jsonl files)")
        prompts.extend(read_documents(path, prompts_only=True))
    if not prompts:
        raise CorpusError(f"the prompts {', '.join(map(str, paths))} hold no text (0 non-empty prompts)")
    return prompts


def looks_like_file(p: str) -> bool:
    """A name with a file suffix or a path prefix is a file; anything else may be a dataset id."""
    return p.endswith((".txt", ".gz", ".jsonl", ".json")) or p.startswith((".", "/", "~"))


def check_corpus_path(p: str) -> None:
    """Fail early (before loading models) on a corpus path that looks like a file and is missing."""
    path = Path(p)
    if path.is_dir():
        raise CorpusError(f"corpus path {path} is a folder; pass the text files inside it")
    if not path.exists() and looks_like_file(p):
        raise CorpusError(f"corpus file {path} does not exist")


def make_chunks(docs: list[str], tokenizer, seq_len: int, n_chunks: int, seed: int = 0,
                min_tokens: int = 16) -> list[str]:
    """Up to `n_chunks` text chunks of about `seq_len` source tokens, documents in a seeded random
    order. Long documents are cut into windows; short ones (most of a fortune-style corpus) are
    packed together, separated by a blank line, so every chunk carries a full sequence of signal."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    width = max(8, seq_len - 2)  # room for BOS and for re-tokenisation drift
    chunks: list[str] = []
    pending, pending_len = [], 0
    for start in range(0, len(order), 64):
        batch_docs = [docs[i] for i in order[start:start + 64]]
        enc = tokenizer(batch_docs, add_special_tokens=False, return_offsets_mapping=True)
        for doc, offsets in zip(batch_docs, enc["offset_mapping"]):
            for t0 in range(0, len(offsets), width):
                window = offsets[t0:t0 + width]
                piece = doc[window[0][0]:window[-1][1]] if window else ""
                if len(window) == width:
                    chunks.append(piece)
                elif window:
                    if pending_len + len(window) + 2 > width and pending_len >= min_tokens:
                        chunks.append("\n\n".join(pending))
                        pending, pending_len = [], 0
                    pending.append(piece)
                    pending_len += len(window) + 2  # + the separator's tokens, roughly
                if len(chunks) >= n_chunks:
                    return chunks
    if pending_len >= min_tokens and len(chunks) < n_chunks:
        chunks.append("\n\n".join(pending))
    return chunks
