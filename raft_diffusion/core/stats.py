"""The statistics of a run: means and standard errors, paired changes, the before -> after summary.

Every evaluation draws the same held-out prompts from the same seeds, so a metric's change since
the base model is measured sample by sample: the mean of (now - then) over the samples both
evaluations share, with the standard error of those differences. That SE is far smaller than the
one of two independent means whenever fine-tuning leaves a seed's sample recognisably the same.
"""

from __future__ import annotations

import math

import torch

SUFFIXES = ("_sem", "_best_of_k", "_change", "_change_sem")


def finite(x: torch.Tensor) -> torch.Tensor:
    return x[torch.isfinite(x)]


def mean(x: torch.Tensor) -> float:
    x = finite(x)
    return float(x.mean()) if x.numel() else float("nan")


def std(x: torch.Tensor) -> float:
    x = finite(x)
    return float(x.std(unbiased=False)) if x.numel() > 1 else 0.0


def sem(x: torch.Tensor) -> float:
    """Standard error of the mean (sample standard deviation over sqrt(n))."""
    x = finite(x)
    return float(x.std() / math.sqrt(x.numel())) if x.numel() > 1 else 0.0


def paired_change(now: dict, then: dict) -> tuple[float, float] | None:
    """Mean and standard error of ``now[key] - then[key]`` over the keys both hold (None below 2 pairs).

    ``now``/``then`` map a sample's identity (its prompt and seed) to that sample's score.
    """
    diffs = [now[key] - then[key] for key in now if key in then and _is_number(then[key]) and _is_number(now[key])]
    diff = torch.tensor(diffs, dtype=torch.float64)
    if finite(diff).numel() < 2:
        return None
    return mean(diff), sem(diff)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(record: dict, key: str) -> float | None:
    value = record.get(key)
    return float(value) if _is_number(value) else None


def dedupe(records: list[dict]) -> list[dict]:
    """One record per stage (the last written), in stage order."""
    by_stage = {r["stage"]: r for r in records}
    return [by_stage[s] for s in sorted(by_stage)]


def eval_names(record: dict) -> list[str]:
    """Held-out metrics of a record: the proxy reward first, then gold ones, then the rest."""
    names = [key[5:] for key in record if key.startswith("eval_") and not key.endswith(SUFFIXES)]
    return sorted(names, key=lambda n: (n != "reward", "gold" not in n, names.index(n)))


def is_reward_part(name: str) -> bool:
    """``reward_<part>``: one part of a weighted proxy reward, held out (its own scale, never normalised)."""
    return name.startswith("reward_")


def summarize(records: list[dict], after: int | None = None) -> dict | None:
    """Held-out metrics at the first evaluation (stage 0: the base model) and at stage ``after``
    (default: the last evaluation).

    Returns ``{"before": stage, "after": stage, "rows": [...]}`` or None without evaluations. Each
    row: name, kind, before, before_sem, after, after_sem, change, change_sem, z (change over its
    standard error), paired, best_of_k (the base model's best-of-k by the proxy). When the ``after``
    evaluation holds a paired change since stage 0, change and its standard error are that;
    otherwise the standard error is sqrt(sem_before^2 + sem_after^2).
    """
    evals = [r for r in dedupe(records) if "eval_reward" in r]
    if not evals:
        return None
    first = evals[0]
    last = next((r for r in evals if r["stage"] == after), evals[-1]) if after is not None else evals[-1]
    rows = []
    for name in eval_names(first):
        before, now = number(first, f"eval_{name}"), number(last, f"eval_{name}")
        if before is None or now is None:
            continue
        sb, sa = number(first, f"eval_{name}_sem"), number(last, f"eval_{name}_sem")
        change, se = now - before, math.sqrt(sb**2 + sa**2) if sb is not None and sa is not None else 0.0
        paired = first["stage"] == 0 and number(last, f"eval_{name}_change_sem") is not None
        if paired:
            change, se = number(last, f"eval_{name}_change"), number(last, f"eval_{name}_change_sem")
        rows.append({
            "name": name,
            "kind": "proxy" if name == "reward" else "proxy part" if is_reward_part(name) else ("gold" if "gold" in name else ""),
            "before": before, "before_sem": sb, "after": now, "after_sem": sa,
            "change": change, "change_sem": se, "z": change / se if se > 0 else None, "paired": paired,
            "best_of_k": number(first, f"eval_{name}_best_of_k"),
        })
    return {"before": first["stage"], "after": last["stage"], "rows": rows}


def over_optimisation(summary: dict, z: float = 2.0) -> list[str]:
    """Eval-only metrics that fell (beyond ``z`` SE) while the proxy rose (beyond ``z`` SE): the
    signature of a policy that exploits its reward."""
    rows = {r["name"]: r for r in summary["rows"]}
    proxy = rows.get("reward")
    if not proxy or proxy["z"] is None or proxy["z"] < z:
        return []
    return [r["name"] for r in summary["rows"]
            if r["name"] != "reward" and not is_reward_part(r["name"]) and r["z"] is not None and r["z"] < -z]
