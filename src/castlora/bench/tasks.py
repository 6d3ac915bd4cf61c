"""Benchmark tasks: two domain-LM tasks from shared/data and two generated exact-match tasks.

Generated tasks are a pure function of the seed (written as prompt/completion jsonl):
- `facts`: recall of fictional facts. 120 invented people, each with a home town and a job.
  Training states every fact in three phrasings (two statements, one Q/A); the test asks every
  fact in a fourth phrasing never seen in training, so the LoRA must have stored the fact, not
  the string.
- `greet`: a fixed output format (a skill). "Greet NAME ->" must become
  " Hello, NAME! Welcome to the club." The test uses names never seen in training, so only the
  format, with copying, can be learnt.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..safe_io import write_text_atomic

SYLLABLES = ["ka", "lo", "mi", "ren", "tas", "vor", "bel", "dun", "fir", "gal", "hul", "jor", "nim", "pel",
             "quin", "sar", "tol", "ur", "wen", "zed"]
TOWNS = ["Ashford", "Brookmere", "Coldwater", "Dunmore", "Eastvale", "Fairholm", "Greystone", "Highcliff",
         "Ironwood", "Kingsbridge", "Larkspur", "Millbrook"]
JOBS = ["baker", "sailor", "painter", "farmer", "doctor", "teacher", "miner", "weaver", "singer", "builder"]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "lm" (test loss) or "exact" (exact-match accuracy)
    train: Path
    test: Path


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()


def _names(rng: random.Random, n: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = _name(rng)
        if x not in avoid and x not in out:
            out.append(x)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def train_prompts(task: Task, folder: Path) -> Path:
    """The training split's prompts without their answers, one `text` line each (read alike by `--prompts` and
    `--corpus`): what a user who kept the prompts but lost the answers holds. Exact-match tasks only."""
    rows = [json.loads(line) for line in task.train.read_text().splitlines() if line.strip()]
    path = folder / f"{task.name}_train_prompts.jsonl"
    _write_jsonl(path, [{"text": r["prompt"]} for r in rows])
    return path


def fresh_prompts(task: Task, folder: Path, shared: Path, seed: int = 0, n: int = 400) -> Path | None:
    """`n` prompts of the task's form that are in neither of its splits (greet: names of another seed; echo: other
    common words), one `text` line each: what a user's new requests would be, which the source LoRA never saw.
    None for a task without such prompts (facts asks about the training people only)."""
    from ..evaluate import load_examples

    seen = {e["prompt"] for e in load_examples(task.train) + load_examples(task.test)}
    make = {"greet": lambda d: make_greet(d, seed + 1000, n_train=2 * n, n_test=0),
            "echo": lambda d: make_echo(d, shared, seed + 1000, n_train=2 * n, n_test=0)}.get(task.name)
    if make is None:
        return None
    other = make(folder / "fresh")
    rows = [e["prompt"] for e in load_examples(other.train) if e["prompt"] not in seen][:n]
    path = folder / f"{task.name}_fresh_prompts.jsonl"
    _write_jsonl(path, [{"text": r} for r in rows])
    return path


def make_facts(folder: Path, seed: int = 0, n_people: int = 120, repeats: int = 4) -> Task:
    rng = random.Random(seed)
    people = [(n, rng.choice(TOWNS), rng.choice(JOBS)) for n in _names(rng, n_people)]
    train = []
    for n, t, j in people * repeats:
        train.append({"prompt": "", "completion": f"{n} lives in {t} and works as a {j}."})
        train.append({"prompt": "", "completion": f"In {t}, {n} is known as a {j}."})
        train.append({"prompt": f"Q: Where does {n} live? A:", "completion": f" {t}"})
    rng.shuffle(train)
    test = [{"prompt": f"Q: Which town is home to {n}? A:", "completion": f" {t}"} for n, t, _ in people]
    _write_jsonl(folder / "facts" / "train.jsonl", train)
    _write_jsonl(folder / "facts" / "test.jsonl", test)
    return Task("facts", "exact", folder / "facts" / "train.jsonl", folder / "facts" / "test.jsonl")


def make_greet(folder: Path, seed: int = 0, n_train: int = 400, n_test: int = 100) -> Task:
    rng = random.Random(seed + 1)
    names = _names(rng, n_train + n_test)
    fmt = lambda n: {"prompt": f"Greet {n} ->", "completion": f" Hello, {n}! Welcome to the club."}  # noqa: E731
    _write_jsonl(folder / "greet" / "train.jsonl", [fmt(n) for n in names[:n_train]])
    _write_jsonl(folder / "greet" / "test.jsonl", [fmt(n) for n in names[n_train:]])
    return Task("greet", "exact", folder / "greet" / "train.jsonl", folder / "greet" / "test.jsonl")


def _common_words(shared: Path, lo: int = 300, hi: int = 3000) -> list[str]:
    """Lower-case words of 4-8 letters ranked lo..hi by frequency in the general corpus (sorted, so
    the list is a pure function of the corpus)."""
    from collections import Counter

    from ..corpus import read_documents
    counts = Counter(w for doc in read_documents(shared / "data" / "general" / "valid.txt.gz")
                     for w in re.findall(r"\b[a-z]{4,8}\b", doc))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return sorted(ranked[lo:hi])


def make_echo(folder: Path, shared: Path, seed: int = 0, n_train: int = 400, n_test: int = 100) -> Task:
    """A skill with copying of *known* words: "Say WORD three times ->" -> " WORD WORD WORD."
    The test words are common English words never seen in training."""
    rng = random.Random(seed + 2)
    words = _common_words(shared)
    rng.shuffle(words)
    fmt = lambda w: {"prompt": f"Say {w} three times ->", "completion": f" {w} {w} {w}."}  # noqa: E731
    _write_jsonl(folder / "echo" / "train.jsonl", [fmt(w) for w in words[:n_train]])
    _write_jsonl(folder / "echo" / "test.jsonl", [fmt(w) for w in words[n_train:n_train + n_test]])
    return Task("echo", "exact", folder / "echo" / "train.jsonl", folder / "echo" / "test.jsonl")


ALL_TASKS = ("shakespeare", "kjv", "greet", "echo", "facts")


def get_task(name: str, shared: Path, folder: Path, seed: int = 0) -> Task:
    if name in ("shakespeare", "kjv"):
        d = shared / "data" / "domains" / name
        return Task(name, "lm", d / "train.txt.gz", d / "test.txt.gz")
    if name == "facts":
        return make_facts(folder, seed)
    if name == "greet":
        return make_greet(folder, seed)
    if name == "echo":
        return make_echo(folder, shared, seed)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(ALL_TASKS)}")
