"""The before -> after summary on held-out prompts, as text (printed when a run ends)."""

from __future__ import annotations

import math

from raft_diffusion.core import stats


def _decimals(row: dict) -> int:
    """Enough decimals to show two digits of the smallest standard error of the row (3 to 6), so a
    change is never printed as +0.000 next to a change/SE that is not zero."""
    sems = [s for s in (row["before_sem"], row["after_sem"], row.get("change_sem")) if s is not None and s > 0 and math.isfinite(s)]
    return min(6, max(3, 1 - math.floor(math.log10(min(sems))))) if sems else 3


def _pm(value: float, sem: float | None, digits: int = 3) -> str:
    return f"{value:.{digits}f} ± {sem:.{digits}f}" if sem is not None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def shows_best_of_k(summary: dict) -> bool:
    """Whether best-of-k tells anything: with one sample per prompt (eval.k = 1) it repeats "before"."""
    return any(r["best_of_k"] is not None and abs(r["best_of_k"] - r["before"]) > 1e-12 for r in summary["rows"])


def row_cells(r: dict, best_of_k: bool = True) -> list[str]:
    """before, after, change, change/SE (and best-of-k) of a summary row, as text."""
    d = _decimals(r)
    z = "-" if r["z"] is None else f"{r['z']:+.1f}"
    cells = [_pm(r["before"], r["before_sem"], d), _pm(r["after"], r["after_sem"], d), _signed(r["change"], d), z]
    if best_of_k:
        cells.append("-" if r["best_of_k"] is None else f"{r['best_of_k']:.{d}f}")
    return cells


def verdict(records: list[dict]) -> str:
    """One line when the proxy rose while an eval-only metric fell (over-optimisation), by the last evaluation."""
    summary = stats.summarize(records)
    fell = stats.over_optimisation(summary) if summary else []
    if not fell:
        return ""
    return (f"warning: by stage {summary['after']} the proxy reward rose while {', '.join(fell)} fell: "
            "the policy is exploiting the proxy")


def outcome_line(outcome: dict | None) -> str:
    """Which stage was exported, and why the run ended (``outcome.json``)."""
    if not outcome:
        return ""
    line = f"exported: stage {outcome['exported_stage']}"
    rule = outcome.get("rule", "last stage")
    if outcome.get("metric") and rule != "last stage":
        line += f" (the best by {outcome['metric']}: {outcome['value']:.4g})"
    elif rule != "last stage":
        line += f" (the {rule})"
    if outcome.get("stopped_early"):
        line += f"; stopped early after stage {outcome['last_stage']}: {outcome['stop_reason']}"
    return line


def summary_table(records: list[dict], outcome: dict | None = None) -> str:
    """The before -> after summary on held-out prompts as plain text (printed after training).
    With ``outcome`` (``outcome.json``), "after" is the exported stage."""
    summary = stats.summarize(records, after=outcome["exported_stage"] if outcome else None)
    if summary is None:
        train = [r for r in stats.dedupe(records) if "reward_policy" in r]
        if not train:
            return "no metrics yet"
        a, b = train[0], train[-1]
        return (
            "no held-out evaluation in this run (eval.every = 0); "
            f"training reward of the policy: stage {a['stage']} {a['reward_policy']:.3f} -> stage {b['stage']} {b['reward_policy']:.3f}"
        )
    before = "stage 0 (base model)" if summary["before"] == 0 else f"stage {summary['before']}"
    best_of_k = shows_best_of_k(summary)
    header = ["metric", "before", "after", "change", "change/SE"] + (["base best-of-k"] if best_of_k else [])
    lines = [header]
    for r in summary["rows"]:
        label = r["name"] + (f" ({r['kind']})" if r["kind"] else "")
        lines.append([label, *row_cells(r, best_of_k)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = [f"held-out prompts: {before} -> stage {summary['after']}"]
    for row in lines:
        text.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if summary["before"] == summary["after"]:
        text.append("(only one evaluation so far)")
    elif any(r["paired"] for r in summary["rows"]):
        text.append("change/SE: sample by sample, over the same held-out prompts and seeds")
    extra = [line for line in (outcome_line(outcome), verdict(records)) if line]
    return "\n".join(text + extra)
