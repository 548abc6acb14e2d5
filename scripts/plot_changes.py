"""Draw a run's held-out changes since the base model, stage by stage, as one PNG (the README's curve).

    python scripts/plot_changes.py runs/demo_long --out docs/demo_long.png [--title "..."]

Each panel is one held-out metric (proxy, gold, eval-only), its paired change and standard error at
every evaluation; the dashed line is the stage exported to ``final/``. ``raft-diffusion report``
puts the same figure at the top of ``report.html``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raft_diffusion.core.run_dir import RunDir  # noqa: E402
from raft_diffusion.report.page import read_outcome  # noqa: E402
from raft_diffusion.report.plots import plot_changes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    run_dir = RunDir(args.run)
    if not run_dir.metrics.is_file():
        print(f"error: {args.run} has no metrics.jsonl", file=sys.stderr)
        return 2
    png = plot_changes(run_dir.read_metrics(), read_outcome(run_dir) if run_dir.is_finished() else None, args.title)
    if png is None:
        print(f"error: {args.run} has no evaluation after the base model", file=sys.stderr)
        return 2
    args.out.write_bytes(png)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
