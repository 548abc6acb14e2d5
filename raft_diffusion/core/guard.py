"""Guardrails against over-optimisation: which stage is exported, and when a run stops early.

The loop shows every evaluation record to a :class:`Guard`, in stage order (a resumed run shows it
the records of ``metrics.jsonl`` first, so the decision is the same as without the interruption).

* ``guard.metric`` names a held-out metric (``eval_reward``, or ``eval_<name>`` of an eval-only
  scorer); the stage where it was highest is the one exported (stage 0: the model RAFT started
  from). ``guard.patience`` stops the run when it has not improved for that many evaluations.
* ``guard.watch`` names held-out metrics that must not fall: the run stops when one lies more than
  ``guard.max_drop_se`` paired standard errors below its best so far (the same prompts and seeds
  sample by sample, see :mod:`raft_diffusion.core.stats`). The stage that failed the watch is never
  exported: the best earlier one by ``guard.metric`` is, or without one the last that passed.
"""

from __future__ import annotations

from typing import Callable

from raft_diffusion.core import stats
from raft_diffusion.core.config import ConfigError

OUTCOME_FILE = "outcome.json"  # in the run folder: which stage was exported, and why the run stopped


def check_guard(config, eval_metrics, has_eval_prompts: bool, reward=None) -> None:
    """Refuse guard settings that name a metric the run does not log (before any model loads).
    The parts of a weighted ``reward`` are held-out metrics too (``eval_reward_<part>``)."""
    g = config.guard
    names = [name for name, _, _ in eval_metrics.parts] if eval_metrics is not None else []
    parts = [name for name, _, _ in reward.parts] if reward is not None and len(reward.parts) > 1 else []
    logged = ["eval_reward", *(f"eval_reward_{name}" for name in parts), *(f"eval_{name}" for name in names)]
    for key, value in [("guard.metric", g.metric)] + [("guard.watch", w) for w in g.watch]:
        if value and value not in logged:
            raise ConfigError(f"{key}: {value!r} is not a held-out metric of this run (logged: {', '.join(logged)})")
    if (g.metric or g.watch) and not has_eval_prompts:
        raise ConfigError("guard: needs held-out prompts (prompts.eval_items, eval_file or eval_builtin)")


class Guard:
    def __init__(self, config, sample_scores: Callable[[int], dict]):
        """``sample_scores(stage)``: that evaluation's per-sample scores, ``{(prompt, seed): {name: value}}``."""
        self.config = config.guard
        self.sample_scores = sample_scores
        self.best_stage: int | None = None
        self.best_value: float | None = None
        self.since_best = 0
        self.watch_best: dict[str, tuple[int, float]] = {}  # metric -> (stage, mean) of its best so far
        self.last_passed: int | None = None  # the last evaluated stage no watched metric failed
        self.stop_reason: str | None = None

    @property
    def selects(self) -> bool:
        return bool(self.config.metric)

    @property
    def active(self) -> bool:
        """Whether the export may be an earlier stage than the last (so stage 0 needs a checkpoint)."""
        return bool(self.config.metric or self.config.watch)

    @property
    def candidate(self) -> int | None:
        """The stage a guard would export if the run ended now (its checkpoint must be kept); None
        without a guard, when the export is the last stage."""
        if not self.active:
            return None
        return self.best_stage if self.selects else self.last_passed

    def observe(self, record: dict) -> None:
        """Take one metrics record (records without an evaluation are ignored)."""
        if "eval_reward" not in record or self.stop_reason:
            return
        stage = record["stage"]
        # The watch comes first: a stage that fails it must not become the best one.
        for name in self.config.watch:
            value = stats.number(record, name)
            if value is None:
                continue
            best = self.watch_best.get(name)
            if best is None or value > best[1]:
                self.watch_best[name] = (stage, value)
                continue
            if self.config.max_drop_se > 0:
                self._check_drop(name, stage, best[0])
                if self.stop_reason:
                    return
        self.last_passed = stage
        metric = self.config.metric
        value = stats.number(record, metric) if metric else None
        if value is not None:
            if self.best_value is None or value > self.best_value:
                self.best_stage, self.best_value, self.since_best = stage, value, 0
            else:
                self.since_best += 1
                if self.config.patience and self.since_best >= self.config.patience:
                    self.stop_reason = (f"{metric} has not improved for {self.since_best} evaluations "
                                        f"(best {self.best_value:.4g} at stage {self.best_stage})")

    def _check_drop(self, name: str, stage: int, best_stage: int) -> None:
        score = name[len("eval_"):]
        now, then = self.sample_scores(stage), self.sample_scores(best_stage)
        change = stats.paired_change({k: v.get(score) for k, v in now.items()}, {k: v.get(score) for k, v in then.items()})
        if change is None or change[1] <= 0:
            return
        z = change[0] / change[1]
        if z < -self.config.max_drop_se:
            self.stop_reason = (f"{name} fell {change[0]:+.4g} ({z:+.1f} paired SE) below its best at stage {best_stage}")

    def export_stage(self, last_stage: int) -> int:
        """The stage to export: the best by ``guard.metric``; without one the last stage, or, when a
        watched metric stopped the run, the last evaluated stage before that."""
        if self.selects and self.best_stage is not None:
            return self.best_stage
        if self.stop_reason and self.last_passed is not None:
            return self.last_passed
        return last_stage

    def outcome(self, last_stage: int) -> dict:
        exported = self.export_stage(last_stage)
        if self.selects and self.best_stage is not None:
            rule = f"best {self.config.metric}"
        elif exported != last_stage:
            rule = "last stage the watch passed"
        else:
            rule = "last stage"
        return {
            "exported_stage": exported,
            "rule": rule,
            "metric": self.config.metric or None,
            "value": self.best_value if self.selects else None,
            "last_stage": last_stage,
            "stopped_early": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
        }
