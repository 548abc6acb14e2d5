"""Run a config under named sets of overrides and tabulate what each does to the held-out metrics.

    python scripts/ablate.py --config configs/demo.yaml --variants variants.yaml --out runs/ablation
    python scripts/ablate.py ... --split train      # tune on the training prompts (fresh seeds), not held-out
    python scripts/ablate.py ... --only base,replay3 --extra run.seed=1

``--variants`` is a YAML file of your own, a mapping ``name: [key=value, ...]``, for example::

    base: []
    replay0: [replay.stages=0]
    lr_half: [train.lr=1.5e-4]

Each variant is an ordinary
``raft-diffusion train`` run (in a subprocess, one after the other) in ``OUT/<name>``; the table
(``OUT/ablation.md``, also printed) gives, per variant, the change of every held-out metric from
the starting model to the exported stage, with its paired standard error, and the wall time.
``--split train`` evaluates on the training prompts with the evaluation seeds instead of the
held-out prompts, so that choices never look at held-out scores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raft_diffusion.core import stats  # noqa: E402


def training_prompts_as_eval(config: str, overrides: list[str]) -> str:
    """The override that evaluates on the training prompts (the evaluation seeds stay fresh)."""
    from raft_diffusion.core.config import load_config

    p = load_config(config, overrides).prompts
    if p.builtin:
        return f"prompts.eval_builtin={p.builtin}"
    if p.file:
        return f"prompts.eval_file={p.file}"
    return "prompts.eval_items=" + json.dumps(p.items)


def run_variant(config: str, name: str, overrides: list[str], out: Path, split: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "raft_diffusion.cli", "train", "--config", config, *overrides, *extra,
           f"run.output_dir={out}", f"run.name={name}", "log.report=false", "log.tensorboard=false", "--overwrite", "--quiet"]
    if split == "train":
        cmd.append(training_prompts_as_eval(config, [*overrides, *extra]))
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"variant {name} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return time.perf_counter() - start


def row(name: str, folder: Path, seconds: float) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    outcome = json.loads((folder / "outcome.json").read_text())
    summary = stats.summarize(records, after=outcome["exported_stage"])
    cells = {r["name"]: (r["change"], r["change_sem"]) for r in summary["rows"] if r["paired"]}
    # The worst the curve ever fell below its best so far, in paired SE, per metric (drift).
    return {"name": name, "exported": outcome["exported_stage"], "stopped": outcome["stopped_early"],
            "cells": cells, "seconds": seconds, "curve": [(r["stage"], {k[5:-7]: r[k] for k in r if k.endswith("_change")}) for r in records if "eval_reward" in r]}


def table(rows: list[dict]) -> str:
    names = [n for n in ("reward", "demo_gold", "demo_gold_align") if any(n in r["cells"] for r in rows)]
    names += sorted({n for r in rows for n in r["cells"]} - set(names) - {"diversity"})
    head = ["variant", "exported stage", *[f"{n} change (SE)" for n in names], "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [f"{r['cells'][n][0]:+.3f} ({r['cells'][n][1]:.3f})" if n in r["cells"] else "" for n in names]
        stage = f"{r['exported']}" + (" (stopped)" if r["stopped"] else "")
        lines.append("| " + " | ".join([r["name"], stage, *cells, f"{r['seconds']:.0f}"]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--variants", required=True, help="YAML: name -> list of key=value overrides")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--split", choices=("held-out", "train"), default="held-out")
    parser.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every variant, e.g. run.seed=1")
    args = parser.parse_args(argv)
    variants = yaml.safe_load(Path(args.variants).read_text())
    chosen = [n for n in variants if not args.only or n in args.only.split(",")]
    rows = []
    for name in chosen:
        seconds = run_variant(args.config, name, list(variants[name] or []), args.out, args.split, args.extra)
        rows.append(row(name, args.out / name, seconds))
        print(f"{name}: done in {seconds:.0f} s", flush=True)
    text = table(rows)
    (args.out / "ablation.md").write_text(text + "\n")
    (args.out / "ablation.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
