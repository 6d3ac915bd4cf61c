"""Merge several `castlora bench` results.json files into one table (markdown on stdout, PNG)."""

import json
import sys
from pathlib import Path

from castlora.bench.report import markdown_table, plot_gap

rows = []
for path in sys.argv[2:]:
    rows += json.loads(Path(path).read_text())["rows"]
table = {"rows": rows}
print(markdown_table(table))
plot_gap(table, Path(sys.argv[1]))
