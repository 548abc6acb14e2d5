"""Metric curves and phase timings of a run (matplotlib's object API on the Agg canvas: no pyplot,
no global backend change)."""

from __future__ import annotations

import io
import math

from raft_diffusion.core import stats


def _figure(title: str, ylabel: str = ""):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("stage")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def _series(records: list[dict], key: str, sem: str | None = None):
    rows = [r for r in records if stats.number(r, key) is not None and math.isfinite(r[key])]
    xs = [r["stage"] for r in rows]
    ys = [r[key] for r in rows]
    es = [(stats.number(r, sem) or 0.0) for r in rows] if sem else None
    return xs, ys, es


def _integer_stages(ax, records: list[dict]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    stages = [r["stage"] for r in records]
    if stages:
        ax.set_xlim(min(stages) - 0.3, max(stages) + 0.3)


def _best_of_k_line(ax, records: list[dict], key: str, k) -> None:
    base = next((r for r in records if r["stage"] == 0 and stats.number(r, key) is not None), None)
    if base is not None:
        ax.axhline(base[key], color="tab:gray", linestyle="--", linewidth=1, label=f"base model, best-of-{k or 'k'}")


def plot_changes(records: list[dict], outcome: dict | None = None, title: str = "") -> bytes | None:
    """One panel per held-out metric: its paired change since the base model at each evaluation
    (± paired SE), the exported stage marked. None when no evaluation after stage 0 has a change."""
    from matplotlib.figure import Figure

    records = stats.dedupe(records)
    names = [n for n in stats.eval_names(next((r for r in records if "eval_reward" in r), {}))
             if any(stats.number(r, f"eval_{n}_change") is not None for r in records)]
    if not names:
        return None
    fig = Figure(figsize=(5.6, 1.9 * len(names) + 0.6), dpi=100)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    exported = outcome["exported_stage"] if outcome else None
    for ax, name in zip(axes, names):
        xs, ys, es = _series(records, f"eval_{name}_change", f"eval_{name}_change_sem")
        xs, ys, es = [0, *xs], [0.0, *ys], [0.0, *es]  # the base model, by definition no change
        kind = "proxy" if name == "reward" else "proxy part" if stats.is_reward_part(name) else (
            "gold, eval only" if "gold" in name else "eval only")
        ax.errorbar(xs, ys, yerr=es, color="tab:orange" if name == "reward" else "tab:red" if "gold" in name else "tab:blue",
                    marker="s", markersize=3, capsize=2, linewidth=1)
        ax.axhline(0.0, color="tab:gray", linewidth=0.8)
        if exported is not None:
            ax.axvline(exported, color="tab:green", linestyle="--", linewidth=1)
        ax.set_ylabel("change", fontsize=8)
        ax.set_title(f"{name} ({kind})", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("stage" + (f"   (dashed: stage {exported}, exported)" if exported is not None else ""))
    _integer_stages(axes[-1], records)
    if title:
        fig.suptitle(title, fontsize=10)
    return _png(fig)


def plot_curves(records: list[dict], k: int | None = None) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) of each metric plot the records allow (``k``: eval samples per prompt)."""
    records = stats.dedupe(records)
    plots = []
    if any("reward_mean" in r or "eval_reward" in r for r in records):
        fig, ax = _figure("proxy reward", "reward")
        for key, label, style in (
            ("reward_chosen_mean", "chosen", dict(color="tab:green", marker="o", markersize=3)),
            ("reward_trained_mean", "fine-tuned on (with replay)", dict(color="tab:olive", marker="o", markersize=3)),
            ("reward_mean", "all candidates", dict(color="tab:blue", marker="o", markersize=3)),
            ("reward_policy", "policy (candidate 0)", dict(color="tab:purple", marker="o", markersize=3, alpha=0.8)),
        ):
            xs, ys, _ = _series(records, key)
            if xs:
                ax.plot(xs, ys, label=label, **style)
        xs, ys, es = _series(records, "eval_reward", "eval_reward_sem")
        if xs:
            ax.errorbar(xs, ys, yerr=es, label="held-out (± SE)", color="tab:orange", marker="s", markersize=4, capsize=3)
        _best_of_k_line(ax, records, "eval_reward_best_of_k", k)
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append(("proxy reward", _png(fig)))
    names = stats.eval_names(next((r for r in records if "eval_reward" in r), {}))
    for name in [n for n in names if n != "reward" and any(f"eval_{n}_sem" in r for r in records)]:
        xs, ys, es = _series(records, f"eval_{name}", f"eval_{name}_sem")
        if not xs:
            continue
        kind = "gold, " if "gold" in name else ""
        what = "part of the proxy reward, held-out" if stats.is_reward_part(name) else f"{kind}held-out, never used for selection"
        fig, ax = _figure(f"{name} ({what})", name)
        ax.errorbar(xs, ys, yerr=es, label="held-out (± SE)", color="tab:red" if kind else "tab:orange", marker="s", markersize=4, capsize=3)
        _best_of_k_line(ax, records, f"eval_{name}_best_of_k", k)
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append((name, _png(fig)))
    diversity = [(key, label) for key, label in (("diversity", "stage candidates"), ("distinct_2", "stage candidates"), ("eval_diversity", "held-out"), ("eval_distinct_2", "held-out")) if any(key in r for r in records)]
    if diversity:
        fig, ax = _figure("diversity (higher: samples of a prompt differ more)")
        for key, label in diversity:
            xs, ys, _ = _series(records, key)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{key.removeprefix('eval_')}, {label}")
        _integer_stages(ax, records)
        ax.legend(fontsize=8)
        plots.append(("diversity", _png(fig)))
    xs, ys, _ = _series(records, "train_loss")
    if xs:
        fig, ax = _figure("fine-tuning loss (mean over the stage)", "loss")
        ax.plot(xs, ys, marker="o", markersize=3, color="tab:brown")
        _integer_stages(ax, records)
        plots.append(("loss", _png(fig)))
    phases = _phases(records)
    staged = [r for r in records if r["stage"] > 0 and "time_stage_s" in r]
    if staged and phases:
        fig, ax = _figure("seconds per stage, by phase", "seconds")
        bottom = [0.0] * len(staged)
        for phase in phases:
            heights = [stats.number(r, f"time_{phase}_s") or 0.0 for r in staged]
            ax.bar([r["stage"] for r in staged], heights, bottom=bottom, label=phase, width=0.7)
            bottom = [b + h for b, h in zip(bottom, heights)]
        _integer_stages(ax, staged)
        ax.legend(fontsize=8, ncol=3)
        plots.append(("time", _png(fig)))
    return plots


_PHASE_ORDER = ("generate", "score", "select", "finetune", "eval", "checkpoint")


def _phases(records: list[dict]) -> list[str]:
    found = {key[5:-2] for r in records for key in r if key.startswith("time_") and key.endswith("_s") and key != "time_stage_s"}
    return sorted(found, key=lambda p: (_PHASE_ORDER.index(p) if p in _PHASE_ORDER else len(_PHASE_ORDER), p))


def timing_rows(records: list[dict]) -> list[dict]:
    """Per phase: stages it ran in, mean and total seconds, share of the run's seconds; then
    "other" (stage files, grids, logging: what no phase timer covers) and the whole run."""
    records = stats.dedupe(records)
    staged = [r for r in records if stats.number(r, "time_stage_s") is not None]
    in_stages = sum(r["time_stage_s"] for r in staged)
    total = in_stages + sum(stats.number(r, "time_eval_s") or 0.0 for r in records if r not in staged)  # + the initial eval
    rows = []
    for phase in _phases(records):
        values = [v for r in records for v in [stats.number(r, f"time_{phase}_s")] if v is not None]
        sec = sum(values)
        rows.append({"phase": phase, "n": len(values), "mean": sec / len(values), "total": sec, "share": sec / total if total > 0 else math.nan})
    if staged:
        rest = in_stages - sum(v for r in staged for key in r if key.startswith("time_") and key != "time_stage_s" for v in [stats.number(r, key)] if v is not None)
        rows.append({"phase": "other (stage files, grids, logging)", "n": len(staged), "mean": rest / len(staged), "total": rest, "share": rest / total if total > 0 else math.nan})
        rows.append({"phase": "all", "n": len(staged), "mean": in_stages / len(staged), "total": total, "share": 1.0})
    return rows
