"""The one experiment runner: an experiment is a folder holding settings.yaml, the `castlora bench` options
(pairs, tasks, methods, seeds, sizes) plus `rows`, the variants it tries as named translate options beside the
bench's own rows (each variant with its imitation control, on the same text). A new teacher or objective
enters through its registry (castlora.register_teacher / register_objective) and is named in a row; nothing
here patches the library.

  python experiments/run.py teachers [--quick] [--out DIR] [any castlora bench flag]

Results land in runs/experiments/NAME (results.json, results.md, gap_recovered.png). A variant that wins on
validation text over at least two seeds by more than their spread becomes the default; a loser gets its row in
docs/levers.md and leaves the code.
"""

import sys
from pathlib import Path

from castlora.cli import main


def run(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        names = sorted(p.name for p in Path(__file__).parent.iterdir() if (p / "settings.yaml").is_file())
        print(f"usage: python experiments/run.py NAME [castlora bench flags]; experiments: {', '.join(names)}",
              file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    settings = Path(__file__).parent / name / "settings.yaml"
    if not settings.is_file():
        print(f"experiments/run.py: no experiment {name!r} ({settings} does not exist)", file=sys.stderr)
        return 2
    out = [] if "--out" in rest else ["--out", str(Path("runs") / "experiments" / name)]
    return main(["bench", "--config", str(settings), *out, *rest])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
