"""Text in: corpus files (or a `datasets` name) -> documents -> fixed-size text chunks.

Chunks are cut by the *source* tokenizer (seq_len tokens each) and kept as text, because both
models must read the same characters; each side then tokenizes the chunk itself (tokens.py pairs
the positions). The chunk order is a pure function of the seed, so a resumed run sees the same
batches as an uninterrupted one.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import stat
from pathlib import Path

from .errors import CorpusError

DOC_SEPARATOR = "\n\n\n"  # shared/data convention: documents are separated by two blank lines


MAX_TEXT_BYTES = 2 * 1024**3  # a corpus, prompts or examples file (decompressed) is read whole: 2 GiB at most
MAX_CONTROL_FRACTION = 0.01  # more NUL/control characters than this and a file is not text
_CONTROL = bytes(c for c in range(32) if chr(c) not in "\t\n\r\f\v") + b"\x7f"


def check_regular_file(path: str | Path, what: str = "corpus file", error=CorpusError) -> Path:
    """Refuse, before reading, a path that is missing or not a regular file (a folder, a FIFO, a device
    such as /dev/zero) or larger than MAX_TEXT_BYTES."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a folder; pass the text files inside it")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{what} {path} is {kind}, not a regular file: save the text to a file and pass that")
    if st.st_size > MAX_TEXT_BYTES:
        raise error(f"{what} {path} is {st.st_size / 1024**3:.1f} GiB, over castlora's {_cap()} cap on a text "
                    "file: split it into several files or pass a sample of it")
    return path


def _cap() -> str:
    return f"{MAX_TEXT_BYTES / 1024**3:g} GiB" if MAX_TEXT_BYTES >= 1024**3 else f"{MAX_TEXT_BYTES} bytes"


def check_is_text(data: bytes | str, where: str, error=CorpusError) -> None:
    """Refuse content that is mostly not text: more than MAX_CONTROL_FRACTION NUL or control characters."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    n_control = len(raw) - len(raw.translate(None, _CONTROL))
    if raw and n_control > MAX_CONTROL_FRACTION * len(raw):
        nul = raw.count(0)
        what = "NUL characters only" if nul == len(raw) else f"{n_control} NUL/control characters in {len(raw)} bytes"
        raise error(f"{where} is not text ({what}): pass a UTF-8 text file")


def read_text_file(path: str | Path, what: str = "corpus file", error=CorpusError) -> str:
    """The whole UTF-8 text of a regular file (.gz decompressed): refused by name when it is not a regular file,
    over the size cap, unreadable, not UTF-8 (naming the line) or not text (NUL/control bytes)."""
    path = check_regular_file(path, what, error)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read(MAX_TEXT_BYTES + 1)
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise error(f"{what} {path} cannot be read: {e}") from e
    if len(raw) > MAX_TEXT_BYTES:
        raise error(f"{what} {path} decompresses to over castlora's {_cap()} cap on a text file: split it into "
                    "several files or pass a sample of it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(f"{what} {path}:{line} is not UTF-8 text (bad byte at offset {e.start}); "
                    "convert it to UTF-8 first") from e
    check_is_text(raw, f"{what} {path}", error)
    return text


def _read_text(path: Path) -> str:
    return read_text_file(path)


def _field(rec: dict, name: str, path: Path, n: int) -> str:
    value = rec[name]
    if not isinstance(value, str):
        raise CorpusError(f"{path}:{n}: field {name!r} is {json.dumps(value)[:40]}, not a string: "
                          "write the text as a JSON string")
    return value


def read_documents(path: str | Path, prompts_only: bool = False) -> list[str]:
    """Documents of one .txt / .txt.gz (split on blank-line pairs) or .jsonl (`text` field) file.

    `prompts_only`: a .jsonl record's `prompt` field alone (its `completion`, if any, is never read),
    else its `text`: the unlabelled task prompts of `--prompts`."""
    path = Path(path)
    what = "prompts file" if prompts_only else "corpus file"
    text = read_text_file(path, what)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise CorpusError(f"{path}:{n} is not a JSON line ({e}): fix or remove that line") from e
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}:{n} is a JSON {type(rec).__name__}, not an object: each line must be "
                                  "an object with a 'text' field (or 'prompt'/'completion')")
            if prompts_only:
                if "prompt" not in rec and "text" not in rec:
                    raise CorpusError(f"{path}:{n} has neither a 'prompt' nor a 'text' field")
                docs.append(_field(rec, "prompt" if "prompt" in rec else "text", path, n))
            elif "text" in rec:
                docs.append(_field(rec, "text", path, n))
            elif "prompt" in rec and "completion" in rec:
                docs.append(_field(rec, "prompt", path, n) + _field(rec, "completion", path, n))
            else:
                raise CorpusError(f"{path}:{n} has neither a 'text' field nor 'prompt'/'completion'")
        check_is_text("".join(docs), f"{what} {path}")
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
        if not path.exists():
            raise CorpusError(f"prompts file {path} does not exist (--prompts takes .txt, .txt.gz or .jsonl files)")
        check_regular_file(path, "prompts file")
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
    if path.exists():
        check_regular_file(path, "corpus file")


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
