"""The loop-level recipe: replay pool, anchors, best-stage export, early stop; on the Gaussian toy."""

import json

import pytest
import torch

from raft_diffusion.core.config import ConfigError
from raft_diffusion.core.loop import RaftLoop
from raft_diffusion.core.run_dir import RunDir
from raft_diffusion.core.scores import FunctionReward, WeightedReward
from raft_diffusion.report import summary_table
from tests.toy import GaussianAdapter, near, negative_distance, reward_of, toy_config  # noqa: F401

GOLD = WeightedReward([("near", 1.0, FunctionReward(near, "near"))])


def cfg(path, **options):
    return toy_config(path, **{"eval__k": 32, **options})


def run(config, adapter=None, resume=False, eval_metrics=GOLD):
    adapter = adapter or GaussianAdapter(mu=0.0, lr=0.3)  # slow enough to pass the gold's peak at stage 2
    run_dir = RunDir(f"{config.run.output_dir}/{config.run.name}")
    start = run_dir.prepare(resume=resume, overwrite=False)
    loop = RaftLoop(config, adapter, reward_of(negative_distance), run_dir, eval_metrics=eval_metrics, log=lambda _m: None)
    loop.run(start_after=start)
    return adapter, run_dir


def _strip(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def _chosen_seeds(run_dir, stage):
    return sorted(json.loads(line)["seed"] for line in (run_dir.stages / f"{stage:06d}" / "chosen.jsonl").read_text().splitlines())


def test_replay_trains_on_earlier_stages_and_the_pool_survives_a_resume(tmp_path):
    options = dict(run__stages=4, replay__stages=2)
    straight, a = run(cfg(tmp_path / "a", **options))
    pool = json.loads((a.checkpoint_dir(3) / "replay.json").read_text())
    # After stage 3 the pool holds what stage 4 replays: the chosen of stages 2 and 3, nothing older.
    assert sorted({e["stage"] for e in pool}) == [2, 3]
    assert sorted(e["seed"] for e in pool) == sorted(_chosen_seeds(a, 2) + _chosen_seeds(a, 3))
    records = {r["stage"]: r for r in a.read_metrics()}
    per_stage = records[1]["n_chosen"]
    assert [records[s]["n_trained_on"] for s in (1, 2, 3, 4)] == [per_stage, 2 * per_stage, 3 * per_stage, 3 * per_stage]

    run(cfg(tmp_path / "b", **{**options, "run__stages": 2}))
    resumed, b = run(cfg(tmp_path / "b", **options), resume=True)
    assert float(resumed.mu.detach()) == float(straight.mu.detach())
    assert _strip(b.read_metrics()) == _strip(a.read_metrics())


def test_replay_cap_keeps_the_highest_rewards(tmp_path):
    _, run_dir = run(cfg(tmp_path, run__stages=3, replay__stages=5, replay__max_samples=10))
    records = {r["stage"]: r for r in run_dir.read_metrics()}
    assert records[3]["n_trained_on"] == 10
    # The ten best of every chosen candidate so far, by the reward each was scored with.
    pool = json.loads((run_dir.checkpoint_dir(2) / "replay.json").read_text())
    chosen_3 = [json.loads(line) for line in (run_dir.stages / "000003" / "chosen.jsonl").read_text().splitlines()]
    rewards = sorted([e["reward"] for e in pool] + [c["reward"] for c in chosen_3], reverse=True)[:10]
    assert records[3]["reward_trained_mean"] == pytest.approx(sum(rewards) / 10, rel=1e-6)
    assert records[3]["reward_trained_mean"] > records[3]["reward_chosen_mean"]  # the pool kept better ones
    kept_old = sum(r >= rewards[-1] for r in (e["reward"] for e in pool))
    assert records[3]["n_replayed"] == kept_old > 0
    assert records[1]["n_replayed"] == 0


def test_anchors_hold_the_policy_near_where_it_started(tmp_path):
    free, _ = run(cfg(tmp_path / "free", run__stages=4))
    anchored, run_dir = run(cfg(tmp_path / "anchored", run__stages=4, replay__anchor_share=0.5, replay__anchor_samples=16))
    # Half of each stage's samples come from the start (mean 0): the MLE lands about halfway.
    assert float(anchored.mu.detach()) < 0.75 * float(free.mu.detach())
    pool = json.loads((run_dir.checkpoint_dir(4) / "replay.json").read_text())
    assert len(pool) == 16 and all(e["anchor"] and e["stage"] == 1 for e in pool)
    records = {r["stage"]: r for r in run_dir.read_metrics()}
    assert records[2]["n_trained_on"] == 2 * records[2]["n_chosen"]


def test_best_stage_is_exported_and_said(tmp_path):
    adapter, run_dir = run(cfg(tmp_path, run__stages=6, guard__metric="eval_near"))
    records = [r for r in run_dir.read_metrics() if "eval_near" in r]
    best = max(records, key=lambda r: r["eval_near"])["stage"]
    assert 0 < best < 6  # the toy over-shoots its gold: the last stage is not the best
    exported = json.loads((run_dir.final / "mu.json").read_text())["mu"]
    saved = torch.load(run_dir.checkpoint_dir(best) / "toy.pt", weights_only=True)["mu"]
    last = torch.load(run_dir.checkpoint_dir(6) / "toy.pt", weights_only=True)["mu"]
    assert exported == float(saved) != float(last)
    outcome = json.loads((run_dir.root / "outcome.json").read_text())
    assert outcome["exported_stage"] == best and outcome["rule"] == "best eval_near" and not outcome["stopped_early"]
    table = summary_table(run_dir.read_metrics(), outcome)
    assert f"-> stage {best}" in table and f"exported: stage {best}" in table


def test_early_stop_when_the_metric_stops_improving(tmp_path):
    _, run_dir = run(cfg(tmp_path, run__stages=12, guard__metric="eval_near", guard__patience=2))
    outcome = json.loads((run_dir.root / "outcome.json").read_text())
    stages = [r["stage"] for r in run_dir.read_metrics()]
    assert outcome["stopped_early"] and "has not improved for 2 evaluations" in outcome["stop_reason"]
    assert stages[-1] == outcome["exported_stage"] + 2 < 12  # stopped right after two evaluations without a gain
    assert outcome["last_stage"] == stages[-1]


def test_early_stop_when_a_watched_metric_falls(tmp_path):
    _, run_dir = run(cfg(tmp_path, run__stages=12, guard__watch=["eval_near"], guard__max_drop_se=3.0))
    outcome = json.loads((run_dir.root / "outcome.json").read_text())
    assert outcome["stopped_early"] and "eval_near fell" in outcome["stop_reason"]
    last = outcome["last_stage"]
    # No guard.metric: the stage that failed the watch is not exported, the evaluation before it is.
    assert last < 12 and outcome["exported_stage"] == last - 1 and outcome["rule"] == "last stage the watch passed"
    records = {r["stage"]: r for r in run_dir.read_metrics()}
    best = max((r for r in records.values() if "eval_near" in r), key=lambda r: r["eval_near"])
    assert records[last]["eval_near"] < best["eval_near"]
    exported = json.loads((run_dir.final / "mu.json").read_text())["mu"]
    assert exported == float(torch.load(run_dir.checkpoint_dir(last - 1) / "toy.pt", weights_only=True)["mu"])
    assert f"exported: stage {last - 1} (the last stage the watch passed)" in summary_table(run_dir.read_metrics(), outcome)


def test_a_stage_that_fails_the_watch_is_never_the_best(tmp_path):
    # The proxy (eval_reward) rises at every stage while eval_near rises, then falls: the stage that
    # tripped the watch has the highest proxy, and must still not be exported.
    _, run_dir = run(cfg(tmp_path, run__stages=12, guard__metric="eval_reward", guard__watch=["eval_near"],
                         guard__max_drop_se=3.0, run__keep_checkpoints=1))
    outcome = json.loads((run_dir.root / "outcome.json").read_text())
    records = {r["stage"]: r for r in run_dir.read_metrics() if "eval_near" in r}
    last = outcome["last_stage"]
    assert outcome["stopped_early"] and "eval_near fell" in outcome["stop_reason"]
    assert max(records.values(), key=lambda r: r["eval_reward"])["stage"] == last  # the proxy peaks where the watch fails
    assert outcome["exported_stage"] == max((r for s, r in records.items() if s < last), key=lambda r: r["eval_reward"])["stage"]
    assert run_dir.checkpoint_dir(outcome["exported_stage"]).is_dir()


def test_resume_is_exact_with_every_option_on(tmp_path):
    options = dict(run__stages=5, replay__stages=2, replay__max_samples=12, replay__anchor_share=0.25, replay__anchor_samples=8,
                   guard__metric="eval_near", guard__patience=3, guard__watch=["eval_near"], guard__max_drop_se=4.0,
                   run__keep_checkpoints=1)
    straight, a = run(cfg(tmp_path / "a", **options))
    run(cfg(tmp_path / "b", **{**options, "run__stages": 3}))
    resumed, b = run(cfg(tmp_path / "b", **options), resume=True)
    assert float(resumed.mu.detach()) == float(straight.mu.detach())
    assert _strip(b.read_metrics()) == _strip(a.read_metrics())
    assert json.loads((a.root / "outcome.json").read_text()) == json.loads((b.root / "outcome.json").read_text())
    assert (a.final / "mu.json").read_text() == (b.final / "mu.json").read_text()
    best = json.loads((a.root / "outcome.json").read_text())["exported_stage"]
    assert a.checkpoint_dir(best).is_dir()  # kept despite keep_checkpoints: 1, it is the one exported


def test_guard_names_a_metric_the_run_logs(tmp_path):
    with pytest.raises(ConfigError, match="eval_gold"):
        run(cfg(tmp_path, guard__metric="eval_gold"))
    with pytest.raises(ConfigError, match="held-out metric"):
        toy_config(tmp_path, guard__metric="reward_mean")


def test_summary_warns_when_the_proxy_rises_while_an_eval_only_metric_falls(tmp_path):
    _, run_dir = run(cfg(tmp_path, run__stages=6))
    table = summary_table(run_dir.read_metrics())
    assert "warning" in table and "near fell" in table
