"""How much of the KL to its teacher a port removes, against the floor its imitation control shows.

Every port's castlora.json records the held-out KL to its teacher (calibration text, never trained
on) before and after training ("start" is the start the scale search chose: the target base when it
chose 0, as the control's usually does). The imitation control trains the same heads toward the
same teacher with the LoRA off, so its end KL is how close a port of this shape gets to the two
base models' difference alone. Then

    reducible KL = start(port) - end(control)
    removed      = (start(port) - end(port)) / reducible

says whether a port stops short of its teacher because it cannot hold the LoRA (removed well
below 1) or because what is left is the base models' difference, which the control cannot remove
either. The held-out text is the calibration batches (32 chunks of general text, 3-4 thousand
aligned positions, the same for port and control); the last column is the KL on the training
stream, also the same texts for both (the generated third is sampled from the source with its
LoRA for the control too).
Runs with --position-weight lora-effect weight their held-out KL too: compare them with care.

  python benchmarks/kl_floor.py runs/lev_nl bl:bl_ctl bl_x8:bl_ctl
"""

import json
import sys
from pathlib import Path


# The calibration texts are the general chunks after the training stream's, so they are the same
# texts only when these options are: otherwise a port and a control are read on different text.
SAME_TEXT = ("corpus", "steps", "batch_size", "seq_len", "calib_batches", "generate", "mix", "seed",
             "generate_from")


def read(folder: Path) -> dict:
    return json.loads((folder / "castlora.json").read_text())


def held_out(rec: dict, folder: Path) -> tuple[float, float, float]:
    """(held-out KL at the start, at the end, mean training KL of the last 20 steps) of one record."""
    kl = rec.get("held_out_kl")
    if not kl:
        raise SystemExit(f"{folder}: no held_out_kl in castlora.json (a CAST-0 or weight-space port has none)")
    tail = [r["kl"] for r in rec["loss_curve"][-20:]]
    return float(kl["start"]), float(kl["end"]), sum(tail) / len(tail)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or any(":" not in a for a in argv[1:]):
        raise SystemExit("usage: kl_floor.py DIR PORT:CONTROL [PORT:CONTROL ...] (folders under DIR/ports)")
    root = Path(argv[0]) / "ports"
    print("| port (control) | KL start | KL end | control start / end | reducible | removed | "
          "training KL, last 20 steps: port / control |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for spec in argv[1:]:
        port, control = spec.split(":", 1)
        rec_p, rec_c = read(root / port), read(root / control)
        differ = [k for k in SAME_TEXT if rec_p["config"].get(k) != rec_c["config"].get(k)]
        if differ:
            print(f"| {port} ({control}) | not comparable (other {', '.join(differ)}: other calibration "
                  f"and training texts) |||||")
            continue
        (s, e, t), (cs, ce, ct) = held_out(rec_p, root / port), held_out(rec_c, root / control)
        reducible = s - ce
        removed = (s - e) / reducible if reducible > 0 else float("nan")
        print(f"| {port} ({control}) | {s:.3f} | {e:.3f} | {cs:.3f} / {ce:.3f} | {reducible:.3f} | "
              f"{removed:.3f} | {t:.3f} / {ct:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
