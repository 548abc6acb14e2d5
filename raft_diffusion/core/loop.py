"""The RAFT stage loop: draw prompts, generate, score, select, fine-tune, evaluate, checkpoint, log.

Model-agnostic: the adapter owns the model, the reward owns scoring (both meet the loop only
through :mod:`raft_diffusion.core.protocols`). Every random draw of the loop is a pure function of
(run seed, stage), the adapter saves its own RNG state and the replay pool is saved with each
checkpoint, so a run resumed after its last complete checkpoint ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from raft_diffusion.core import dist, progress, stats
from raft_diffusion.core.config import Config, ConfigError
from raft_diffusion.core.errors import DivergedError
from raft_diffusion.core.guard import OUTCOME_FILE, Guard, check_guard
from raft_diffusion.core.prompts import load_prompts, stage_prompts
from raft_diffusion.core.protocols import Adapter, Candidate, RewardError, has_log_ratio
from raft_diffusion.core.replay import ReplayPool
from raft_diffusion.core.run_dir import DIVERGED_FILE, STATE_FILE, RunDir, atomic_dir, atomic_write_text
from raft_diffusion.core.scores import WeightedReward, moments
from raft_diffusion.core.selection import ranking_scores, select

# Stage number used to derive evaluation seeds: the same held-out noise at every evaluation,
# never equal to the noise of a training stage.
EVAL_STAGE = 2**31 - 1
EVAL_SCORES_FILE = "eval_scores.jsonl"  # per held-out sample: prompt, seed and every metric's score


def candidate_seeds(run_seed: int, stage: int, prompt_indices, k: int, offset: int = 0) -> list[int]:
    """One seed per candidate, derived from (run seed, stage, prompt position, candidate index)."""
    seeds = []
    for p in prompt_indices:
        for j in range(k):
            state = np.random.SeedSequence([run_seed, offset, stage, p, j]).generate_state(2, np.uint32)
            seeds.append(int(state[0]) << 31 | int(state[1]) >> 1)
    return seeds


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM arrived; the run folder is resumable. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way (a user's reward, say) swallows it."""


@dataclass
class Scored:
    rewards: torch.Tensor  # [N] the weighted total
    parts: dict[str, torch.Tensor]  # each reward on its own, when there are several


_mean, _std, _sem = stats.mean, stats.std, stats.sem


def part_stats(parts: dict[str, torch.Tensor], normalized: dict[str, torch.Tensor], chosen: list[int]) -> dict[str, float]:
    """Each part of a weighted reward: its mean and spread over the candidates and its mean over the
    chosen ones, as scored; for a normalised part also the chosen ones' mean as it entered the sum."""
    out = {}
    for name, value in parts.items():
        out[f"reward_{name}_mean"] = _mean(value)
        out[f"reward_{name}_std"] = _std(value)
        out[f"reward_{name}_chosen_mean"] = _mean(value[chosen])
        if name in normalized and normalized[name] is not value:
            out[f"reward_{name}_normalized_chosen_mean"] = _mean(normalized[name][chosen])
    return out


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Fraction of distinct word n-grams among all n-grams (higher is more diverse)."""
    grams = [tuple(words[i : i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def image_distances(outputs: list, k: int) -> list[float]:
    """Pairwise RMS pixel distances (0-1 scale) among the K candidates of each prompt."""
    distances = []
    for start in range(0, len(outputs) - k + 1, k):
        group = np.stack([np.asarray(o.convert("RGB").resize((32, 32)), dtype=np.float32) / 255 for o in outputs[start : start + k]])
        flat = group.reshape(k, -1)
        for a in range(k):
            for b in range(a + 1, k):
                distances.append(float(np.sqrt(np.mean((flat[a] - flat[b]) ** 2))))
    return distances


def diversity(outputs: list, k: int) -> dict[str, float]:
    """Diversity of the candidates of every process (each passes its own; a collective call): distinct
    word bigrams of texts, or the mean pairwise pixel distance among each prompt's K images."""
    if outputs and isinstance(outputs[0], str):
        mine = ("texts", list(outputs))
    elif outputs and hasattr(outputs[0], "convert") and k > 1:
        mine = ("images", image_distances(outputs, k))
    else:
        mine = (None, [])
    parts = dist.gather_objects(mine)
    kinds = {kind for kind, _ in parts if kind}
    every = [x for _, values in parts for x in values]
    if kinds == {"texts"}:
        return {"distinct_2": distinct_n(every, 2)}
    if kinds == {"images"}:
        return {"diversity": float(np.mean(every)) if every else 0.0}
    return {}


class RaftLoop:
    """Runs the stages of one RAFT run into a run folder."""

    def __init__(
        self,
        config: Config,
        adapter: Adapter,
        reward: WeightedReward,
        run_dir: RunDir,
        eval_metrics: WeightedReward | None = None,
        on_stage: Callable[..., None] | None = None,
        log: Callable[[str], None] = print,
        on_eval: Callable[..., None] | None = None,
        on_record: Callable[[dict], None] | None = None,
    ):
        self.config = config
        self.adapter = adapter
        self.reward = reward
        self.run_dir = run_dir
        self.eval_metrics = eval_metrics
        self.on_stage = on_stage  # e.g. writes the stage's image grid (main process only)
        self.on_eval = on_eval  # e.g. writes the held-out grid (main process only)
        self.on_record = on_record  # e.g. TensorBoard: every record appended to metrics.jsonl
        self.log = log if dist.is_main() else (lambda _msg: None)
        self.train_prompts, self.eval_prompts = load_prompts(config.prompts)
        if config.eval.max_prompts:
            self.eval_prompts = self.eval_prompts[: config.eval.max_prompts]
        if config.selection.beta > 0 and not has_log_ratio(adapter):
            raise ConfigError("selection.beta > 0 needs an adapter with log_ratio")
        self.pool = ReplayPool(config, config.run.seed)
        self.guard = Guard(config, self._sample_scores)
        self._eval_samples: dict[int, dict] = {}  # stage -> per-sample eval scores (guard.watch reads them)
        check_guard(config, self.eval_metrics, bool(self.eval_prompts), reward)

    # -- the run ---------------------------------------------------------------------------

    def run(self, start_after: int = 0) -> list[dict]:
        """Run stages ``start_after + 1 .. run.stages``; a resumed run passes its last complete stage."""
        cfg = self.config
        records = []
        with self._interruptible():
            earlier = [r for r in self.run_dir.read_metrics() if r["stage"] <= start_after]
            for record in earlier:  # a resumed run: what the guard saw before
                self.guard.observe(record)
            if (self.run_dir.checkpoint_dir(start_after) / STATE_FILE).is_file():
                self._restore(start_after)
            elif cfg.eval.every and self.eval_prompts and not any(r["stage"] == 0 for r in earlier):
                start = time.perf_counter()
                record = {"stage": 0, **self.evaluate(0), "time_eval_s": time.perf_counter() - start}
                self.guard.observe(record)
                if self.guard.active:  # stage 0 may be the one exported: keep the starting weights
                    self._checkpoint(0, record)
                if dist.is_main():
                    self.run_dir.append_metrics(record)
                    if self.on_record is not None:
                        self.on_record(record)
                self.log(format_stage_line(record))
                records.append(record)
            for stage in range(start_after + 1, cfg.run.stages + 1):
                if self.guard.stop_reason:
                    break
                records.append(self.run_stage(stage))
            if self.guard.stop_reason:
                self.log(f"stopped early after stage {self.run_dir.last_stage()}: {self.guard.stop_reason}")
            self._export_final()
        return records

    def _restore(self, stage: int) -> None:
        """Continue after ``stage``: the adapter's and the replay pool's state."""
        folder = self.run_dir.checkpoint_dir(stage)
        self.adapter.load(folder)
        if self.pool.active:
            self.pool.load(folder)
        self.log(f"resumed after stage {stage} from {folder}")

    def run_stage(self, stage: int) -> dict:
        cfg = self.config
        times: dict[str, float] = {}
        stage_start = time.perf_counter()

        # 1. Draw this stage's prompts; this process handles a contiguous share of them.
        prompts = stage_prompts(self.train_prompts, cfg.sampling.prompts_per_stage, cfg.run.seed, stage, cfg.prompts.shuffle)
        local = dist.shard(len(prompts))
        k = cfg.sampling.k
        label = f"stage {stage}/{cfg.run.stages}"

        # 2. Generate K candidates per prompt, each from its own seed.
        with _timed(times, "generate"), progress.phase(f"{label} generate", total=len(local) * k, unit="sample"):
            seeds = candidate_seeds(cfg.run.seed, stage, local, k, cfg.sampling.seed_offset)
            candidates = self._generate([prompts[i] for i in local], k, seeds, first_prompt=local.start)

        # 3. Score every candidate; gather the scores of all processes.
        with _timed(times, "score"), progress.phase(f"{label} score"):
            scored = self._score(candidates)
            parts = {name: dist.concat_gathered(v) for name, v in scored.parts.items()}
            if self.reward.normalized_parts:  # z-scores over the whole stage: after gathering every process's
                groups = [i // k for i in range(len(prompts) * k)]
                normalized = self.reward.normalized(parts, groups)
                rewards = self.reward.combine(parts, groups).view(len(prompts), k)
            else:
                normalized, rewards = {}, dist.concat_gathered(scored.rewards).view(len(prompts), k)

        # 4. Select, on every process identically.
        with _timed(times, "select"):
            log_ratio = None
            if cfg.selection.beta > 0:
                log_ratio = dist.concat_gathered(self.adapter.log_ratio(candidates).float()).view(len(prompts), k)
            ranking = ranking_scores(rewards, log_ratio, cfg.selection.beta)
            chosen_idx = select(ranking, cfg.selection.strategy, cfg.selection.keep)
            if not chosen_idx:
                raise RewardError("no candidate has a finite reward in this stage; check the reward function")
            chosen = self._gather(candidates, chosen_idx, first=local.start * k)
            flat = rewards.reshape(-1)
            chosen_rewards = [float(flat[i]) for i in chosen_idx]
            if self.pool.wants_anchors:  # the starting model's own samples, unselected
                anchor_idx = self.pool.anchor_indices(len(flat), stage)
                self.pool.add_anchors(stage, self._gather(candidates, anchor_idx, first=local.start * k),
                                      [float(flat[i]) for i in anchor_idx])
            train_set, pool_stats = self.pool.training_set(stage, chosen, chosen_rewards) if self.pool.active else (chosen, {})

        # 5. Fine-tune on the chosen candidates (and the replayed ones) with the ordinary supervised loss.
        train_stats = {}
        if cfg.train.steps_per_stage > 0:
            with _timed(times, "finetune"), progress.phase(f"{label} fine-tune", total=cfg.train.steps_per_stage, unit="step"):
                try:
                    train_stats = self.adapter.finetune(train_set)
                    if not math.isfinite(train_stats.get("loss", 0.0)):  # an adapter without the shared finetuner
                        raise DivergedError(f"fine-tuning diverged: loss {train_stats['loss']}; likely train.lr "
                                            f"({cfg.train.lr:g}) too high, or the precision")
                except DivergedError as err:
                    raise self._diverged(stage, err) from None
        self.pool.update(stage, chosen, chosen_rewards)

        # 6. Evaluate the updated model on the held-out prompts.
        eval_record = {}
        if cfg.eval.every and self.eval_prompts and (stage % cfg.eval.every == 0 or stage == cfg.run.stages):
            with _timed(times, "eval"), progress.phase(f"{label} evaluate", total=len(dist.shard(len(self.eval_prompts))) * cfg.eval.k, unit="sample"):
                eval_record = self.evaluate(stage)

        record = {
            "stage": stage,
            "reward_mean": _mean(flat),
            "reward_std": _std(flat),
            "reward_chosen_mean": _mean(flat[chosen_idx]),
            "reward_policy": _mean(rewards[:, 0]),  # candidate 0 of each prompt: an unbiased policy estimate
            "reward_max": float(flat[torch.isfinite(flat)].max()),
            "n_candidates": int(flat.numel()),
            "n_chosen": len(chosen_idx),
            "n_nonfinite": int((~torch.isfinite(flat)).sum()),
            **(part_stats(parts, normalized, chosen_idx) if len(parts) > 1 else {}),
            **({"log_ratio_mean": _mean(log_ratio.reshape(-1))} if log_ratio is not None else {}),
            **diversity([c.output for c in candidates], k),
            **eval_record,
            **{f"train_{key}": value for key, value in train_stats.items()},
            **pool_stats,
        }
        self.guard.observe(record)

        # 7. Checkpoint (the stage counts as done once this folder is renamed into place).
        self._save_stage_files(stage, prompts, candidates, rewards, chosen_idx, local.start)
        record.update({f"time_{name}_s": round(sec, 4) for name, sec in times.items()})
        with _timed(times, "checkpoint"):
            self._checkpoint(stage, record)
        record["time_checkpoint_s"] = round(times["checkpoint"], 4)
        record["time_stage_s"] = round(time.perf_counter() - stage_start, 4)

        # 8. Log.
        if dist.is_main():
            self.run_dir.append_metrics(record)
            if self.on_record is not None:
                self.on_record(record)
        self.log(format_stage_line(record, cfg.run.stages))
        return record

    def _diverged(self, stage: int, err: DivergedError) -> DivergedError:
        """Record the divergence in the stage's folder (the resume that fixes it may change the rate and
        the precision, see ``run_dir.FIXES_DIVERGENCE``) and say where the run stands: nothing of this
        stage is checkpointed, nothing exported."""
        last = self.run_dir.last_stage()
        if dist.is_main():
            record = {"stage": stage, "last_good_stage": last, "error": str(err)}
            atomic_write_text(self.run_dir.stage_dir(stage) / DIVERGED_FILE, json.dumps(record) + "\n")
        kept = f"the last good checkpoint is stage {last}" if last else "no stage was finished"
        return DivergedError(f"stage {stage}: {err}; {kept}, nothing exported: fix it and pass --resume")

    # -- phases ----------------------------------------------------------------------------

    def _generate(self, prompts: list[str], k: int, seeds: list[int], first_prompt: int) -> list[Candidate]:
        candidates = self.adapter.generate(prompts, k, seeds) if prompts else []
        if len(candidates) != len(prompts) * k:
            raise RuntimeError(f"adapter returned {len(candidates)} candidates for {len(prompts)} prompts x k={k}")
        for i, cand in enumerate(candidates):
            cand.prompt_index, cand.k_index = first_prompt + i // k, i % k
        return candidates

    def _score(self, candidates: list[Candidate], reward: WeightedReward | None = None) -> Scored:
        reward = reward or self.reward
        outputs = [c.output for c in candidates]
        prompts = [c.prompt for c in candidates]
        if not candidates:
            return Scored(torch.zeros(0), {name: torch.zeros(0) for name, _, _ in reward.parts})
        try:
            parts = reward.score_parts(outputs, prompts)
        except RewardError:
            raise
        except Exception as err:  # a user's reward failing is reported as the reward's error, in one line
            raise RewardError(f"reward failed: {type(err).__name__}: {err}") from err
        total = reward.combine(parts)
        if not torch.isfinite(total).any():
            raise RewardError(f"reward returned no finite score for any of {len(outputs)} outputs")
        return Scored(total, parts)

    def _gather(self, candidates: list[Candidate], indices: list[int], first: int) -> list[Candidate]:
        """The candidates at these flat indices of the stage (``first``: this process's first), in that
        order, on every process (training shards the batches)."""
        mine = {i: candidates[i - first] for i in indices if first <= i < first + len(candidates)}
        if dist.world_size() == 1:
            return [mine[i] for i in indices]
        light = {i: Candidate(c.prompt, c.seed, None, c.payload, c.prompt_index, c.k_index) for i, c in mine.items()}
        everything: dict[int, Candidate] = {}
        for part in dist.gather_objects(light):
            everything.update(part)
        return [everything[i] for i in indices]

    def evaluate(self, stage: int = 0) -> dict[str, float]:
        """Held-out prompts, fixed seeds: the same noise at every evaluation (after ``stage``)."""
        cfg = self.config
        k = cfg.eval.k
        local = dist.shard(len(self.eval_prompts))
        seeds = candidate_seeds(cfg.run.seed, EVAL_STAGE, local, k)
        candidates = self._generate([self.eval_prompts[i] for i in local], k, seeds, first_prompt=local.start)
        scored = self._score(candidates)
        parts = {name: dist.concat_gathered(v) for name, v in scored.parts.items()}
        if self.reward.normalized_parts:  # one fixed scale for every evaluation: see _eval_reference
            reference = self._eval_reference(stage, parts)
            proxy = self.reward.combine(parts, reference=reference).view(-1, k)
        else:
            proxy = dist.concat_gathered(scored.rewards).view(-1, k)
        best = proxy.nan_to_num(nan=-math.inf).argmax(dim=1)  # best-of-k by the proxy, per prompt
        record = {
            "eval_reward": _mean(proxy),
            "eval_reward_sem": _sem(proxy.reshape(-1)),
            "eval_reward_best_of_k": _mean(proxy.gather(1, best[:, None])),
        }
        metrics, part_scores = {}, {}
        if len(parts) > 1 or self.reward.normalized_parts:  # each part on its own scale: which part moved
            for name, value in parts.items():
                value = part_scores[f"reward_{name}"] = value.view(-1, k)
                record[f"eval_reward_{name}"] = _mean(value)
                record[f"eval_reward_{name}_sem"] = _sem(value.reshape(-1))
                record[f"eval_reward_{name}_best_of_k"] = _mean(value.gather(1, best[:, None]))
        if self.eval_metrics is not None:
            outputs, prompts = [c.output for c in candidates], [c.prompt for c in candidates]
            for name, value in self.eval_metrics.score_parts(outputs, prompts).items():
                value = metrics[name] = dist.concat_gathered(value).view(-1, k)
                record[f"eval_{name}"] = _mean(value)
                record[f"eval_{name}_sem"] = _sem(value.reshape(-1))
                record[f"eval_{name}_best_of_k"] = _mean(value.gather(1, best[:, None]))
        record.update({f"eval_{key}": v for key, v in diversity([c.output for c in candidates], k).items()})
        record.update(self._paired_changes(stage, {"reward": proxy, **part_scores, **metrics}))
        if self.on_eval is not None and dist.is_main():
            self.on_eval(stage=stage, folder=self.run_dir.stage_dir(stage), candidates=candidates, rewards=proxy, metrics=metrics)
        return record

    def _paired_changes(self, stage: int, scores: dict[str, torch.Tensor]) -> dict[str, float]:
        """Write this evaluation's per-sample scores; return each metric's paired change since stage 0
        (``eval_<name>_change`` and ``eval_<name>_change_sem``, see :func:`stats.paired_change`)."""
        cfg = self.config
        k = cfg.eval.k
        seeds = candidate_seeds(cfg.run.seed, EVAL_STAGE, range(len(self.eval_prompts)), k)
        keys = [(self.eval_prompts[i // k], seed) for i, seed in enumerate(seeds)]
        flat = {name: value.reshape(-1).tolist() for name, value in scores.items()}
        if dist.is_main():
            lines = [
                json.dumps({"prompt": prompt, "prompt_index": i // k, "k_index": i % k, "seed": seed,
                            **{name: values[i] for name, values in flat.items()}})
                for i, (prompt, seed) in enumerate(keys)
            ]
            atomic_write_text(self.run_dir.stage_dir(stage) / EVAL_SCORES_FILE, "\n".join(lines) + "\n")
        self._eval_samples[stage] = {key: {n: v[i] for n, v in flat.items()} for i, key in enumerate(keys)}
        if stage == 0:
            return {}
        base = self._sample_scores(0)
        out = {}
        for name in flat:
            change = stats.paired_change({key: row[name] for key, row in self._eval_samples[stage].items()},
                                         {key: row.get(name) for key, row in base.items()})
            if change is not None:
                out[f"eval_{name}_change"], out[f"eval_{name}_change_sem"] = change
        return out

    def _eval_reference(self, stage: int, parts: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
        """The held-out mean and std of each normalised part at the first evaluation (the base model):
        z-scoring each evaluation by its own statistics would centre every one on 0, so held-out
        ``eval_reward`` of a normalised reward is in units of the base model's spread, from its mean."""
        base = self._sample_scores(0) if stage != 0 else {}
        reference = {}
        for name in self.reward.normalized_parts:
            values = [row[f"reward_{name}"] for row in base.values() if isinstance(row.get(f"reward_{name}"), (int, float))]
            reference[name] = moments(torch.tensor(values) if values else parts[name])
        return reference

    def _sample_scores(self, stage: int) -> dict:
        """``{(prompt, seed): {metric: score}}`` of one evaluation (read back from its file after a resume)."""
        if stage not in self._eval_samples:
            path = self.run_dir.stages / f"{stage:06d}" / EVAL_SCORES_FILE
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
            self._eval_samples[stage] = {(r["prompt"], r["seed"]): r for r in rows}
        return self._eval_samples[stage]

    def _save_stage_files(self, stage, prompts, candidates, rewards, chosen_idx, first_prompt) -> None:
        if not dist.is_main():
            return
        folder = self.run_dir.stage_dir(stage)
        k = self.config.sampling.k
        flat = rewards.reshape(-1)
        lines = []
        for rank, i in enumerate(chosen_idx):
            entry = {"rank": rank, "prompt": prompts[i // k], "prompt_index": i // k, "k_index": i % k, "reward": float(flat[i])}
            local = i - first_prompt * k
            if 0 <= local < len(candidates):
                entry["seed"] = candidates[local].seed
                if isinstance(candidates[local].output, str):
                    entry["output"] = candidates[local].output
            lines.append(json.dumps(entry))
        (folder / "chosen.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if self.on_stage is not None:
            self.on_stage(stage=stage, folder=folder, prompts=prompts, candidates=candidates, rewards=rewards, chosen=chosen_idx, first_prompt=first_prompt)

    def _checkpoint(self, stage: int, record: dict) -> None:
        target = self.run_dir.checkpoint_dir(stage)
        tmp = target.with_name(f".tmp-{target.name}")
        with _deferred_signals():
            if dist.is_main():
                target.parent.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    import shutil

                    shutil.rmtree(tmp)
                tmp.mkdir()
            dist.barrier()
            self.adapter.save(tmp)
            if self.pool.active and dist.is_main():
                self.pool.save(tmp)
            dist.barrier()
            if dist.is_main():
                (tmp / STATE_FILE).write_text(json.dumps({"stage": stage, "metrics": record}), encoding="utf-8")
                tmp.rename(target)
                keep = {self.guard.candidate} if self.guard.candidate is not None else set()
                self.run_dir.prune_checkpoints(self.config.run.keep_checkpoints, protect=keep)
            dist.barrier()

    def _export_final(self) -> None:
        """Export the stage the guard names (see :meth:`Guard.export_stage`) to ``final/``,
        and say in ``outcome.json`` which one it is and why the run ended."""
        last = self.run_dir.last_stage()
        outcome = self.guard.outcome(last)
        exported = outcome["exported_stage"]
        with _deferred_signals():
            if exported != last:
                self.adapter.load(self.run_dir.checkpoint_dir(exported))
            if dist.is_main():
                with atomic_dir(self.run_dir.final) as tmp:
                    self.adapter.export(tmp)
                atomic_write_text(self.run_dir.root / OUTCOME_FILE, json.dumps(outcome, indent=2) + "\n")
            dist.barrier()
        which = f"stage {exported}" + (f" (the {outcome['rule']})" if outcome["rule"] != "last stage" else "")
        self.log(f"exported {which} to {self.run_dir.final}")

    # -- signals ---------------------------------------------------------------------------

    @contextmanager
    def _interruptible(self):
        """Turn SIGINT/SIGTERM into RunInterrupted (deferred while a checkpoint is being written)."""
        if not _is_main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, _frame):
            if _DEFER.active:
                _DEFER.pending = signum
                return
            raise RunInterrupted(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


class _Defer:
    active = False
    pending: int | None = None


_DEFER = _Defer()


@contextmanager
def _deferred_signals():
    """Finish what is being written before acting on SIGINT/SIGTERM."""
    _DEFER.active, _DEFER.pending = True, None
    try:
        yield
    finally:
        _DEFER.active = False
        if _DEFER.pending is not None:
            signum, _DEFER.pending = _DEFER.pending, None
            raise RunInterrupted(signal.Signals(signum).name)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextmanager
def _timed(times: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - start


def format_stage_line(record: dict, stages: int | None = None) -> str:
    """One concise line per stage: rewards (all / chosen / policy / eval), gold, seconds per phase."""
    stage = record["stage"]
    head = f"stage {stage}/{stages}" if stages and stage else ("initial eval" if stage == 0 else f"stage {stage}")
    parts = [head]
    if "reward_mean" in record:
        parts.append(
            f"reward {record['reward_mean']:.3f} chosen {record['reward_chosen_mean']:.3f} policy {record['reward_policy']:.3f}"
        )
    if "eval_reward" in record:
        parts.append(f"eval {record['eval_reward']:.3f}")
    for key, value in record.items():
        if key.startswith("eval_") and key != "eval_reward" and not key.endswith(("_sem", "_best_of_k", "_change")) and isinstance(value, float):
            parts.append(f"{key[5:]} {value:.3f}")
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.4f}")
    timing = [f"{key[5:-2]} {value:.1f}s" for key, value in record.items() if key.startswith("time_") and key != "time_stage_s"]
    if timing:
        parts.append("(" + ", ".join(timing) + (f"; stage {record['time_stage_s']:.1f}s" if "time_stage_s" in record else "") + ")")
    return " | ".join(parts)
