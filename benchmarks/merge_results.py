"""Merge several `castlora bench` results.json files into one table (markdown on stdout, PNG).

  python benchmarks/merge_results.py OUT.png RESULTS.json... [--json MERGED.json]

--json also writes the merged rows with each source file's config, commit, hardware and wall time.
"""

import json
import sys
from pathlib import Path

from castlora.bench.report import markdown_table, plot_gap

args = sys.argv[1:]
merged = None
if "--json" in args:
    i = args.index("--json")
    merged = Path(args[i + 1])
    del args[i:i + 2]
rows, runs = [], []
for path in args[1:]:
    table = json.loads(Path(path).read_text())
    rows += table["rows"]
    runs.append({"file": path, **{k: table.get(k) for k in ("config", "commit", "hardware", "wall_seconds")}})
table = {"rows": rows}
print(markdown_table(table))
plot_gap(table, Path(args[0]))
if merged:
    merged.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
