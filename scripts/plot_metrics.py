#!/usr/bin/env python
"""Training curves of one run, or of several on one figure, from their metrics.jsonl.

    python scripts/plot_metrics.py out/pretrain                            # -> out/pretrain/curves.png
    python scripts/plot_metrics.py out/lr_3e-4 out/lr_1e-3 --out lr.png    # two runs overlaid, one colour each

train.py writes OUT_DIR/curves.png itself at the end of every run; this draws it again (during a run, say)
or compares runs. Panels: loss against steps and against tokens seen, learning rate, and where a run logged
them DPO's reward margin and accuracy, GRPO's reward, KL and completion length (trainer/plots.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.plots import CURVES, plot_runs  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dirs", nargs="+", type=Path, metavar="OUT_DIR", help="run folder(s) holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help=f"the picture to write (default: OUT_DIR/{CURVES} for one "
                   f"run, ./{CURVES} for several)")
    args = p.parse_args(argv)
    out = args.out or (args.out_dirs[0] / CURVES if len(args.out_dirs) == 1 else Path(CURVES))
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        p.error(f"--out {out}: name a .png, .svg or .pdf file")
    try:
        figure = plot_runs(args.out_dirs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    figure.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
