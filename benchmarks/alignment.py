"""Alignment fraction and shared-vocabulary size for each zoo tokenizer pair.

  python benchmarks/alignment.py [SHARED_DIR]   # first 300 docs of general/valid, max_length 256
"""

import gzip
import sys
from pathlib import Path

from castlora.models import load_tokenizer
from castlora.tokens import alignment_stats, shared_vocab

shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared")
docs = [d for d in gzip.open(shared / "data/general/valid.txt.gz", "rt", encoding="utf-8").read().split("\n\n\n")
        if d.strip()][:300]
print(f"{'pair':<16}{'aligned (source)':>18}{'aligned (target)':>18}{'shared vocab':>14}")
for s, t in (("llama", "mistral"), ("llama", "neox"), ("mistral", "neox")):
    ts, tt = load_tokenizer(str(shared / "zoo" / s)), load_tokenizer(str(shared / "zoo" / t))
    st = alignment_stats(docs, ts, tt, max_length=256)
    print(f"{s + '-' + t:<16}{st['aligned_fraction_s']:>18.4f}{st['aligned_fraction_t']:>18.4f}"
          f"{shared_vocab(ts, tt).size:>14,}")
