"""The RAFT loop on a Gaussian policy: no model library involved."""

import json
import math

import pytest
import torch

from raft_diffusion.core.loop import RaftLoop, candidate_seeds
from raft_diffusion.core.run_dir import RunDir
from raft_diffusion.core.protocols import RewardError
from tests.toy import GaussianAdapter, reward_of, toy_config

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors


def run_loop(config, adapter, reward, resume=False):
    run_dir = RunDir(f"{config.run.output_dir}/{config.run.name}")
    start = run_dir.prepare(resume=resume, overwrite=False)
    loop = RaftLoop(config, adapter, reward, run_dir, log=lambda _m: None)
    return loop.run(start_after=start), run_dir


def test_raft_moves_the_mean_toward_the_target(tmp_path):
    config = toy_config(tmp_path, run__stages=6)
    adapter = GaussianAdapter(mu=0.0)
    records, _ = run_loop(config, adapter, reward_of(lambda xs, _p: [-abs(x - 3.0) for x in xs]))
    mus = [r["eval_reward"] for r in records]
    assert records[0]["stage"] == 0 and len(records) == 7
    assert mus[-1] > mus[0] + 1.0  # eval reward rises by a lot: the mean walked toward 3
    assert 2.0 < float(adapter.mu.detach()) < 4.0


def _one_stage_shift(tmp_path, strategy, keep, k=4, prompts=3000):
    config = toy_config(
        tmp_path,
        run__stages=1,
        run__name=strategy,
        sampling__k=k,
        sampling__prompts_per_stage=prompts,
        selection__strategy=strategy,
        selection__keep=keep,
        prompts__items=["p"],
        prompts__eval_items=[],
    )
    adapter = GaussianAdapter(mu=0.0, sigma=2.0)
    run_loop(config, adapter, reward_of(lambda xs, _p: list(xs)))  # reward = x: monotone
    return float(adapter.mu.detach()) / adapter.sigma


def test_local_best_of_k_shifts_by_expected_maximum(tmp_path):
    # E[max of 4 standard normals] = 1.0294
    assert _one_stage_shift(tmp_path, "local", keep=0.25) == pytest.approx(1.0294, abs=0.05)


def test_global_selection_differs_from_local_as_theory_says(tmp_path):
    # Top quarter of the whole batch: E[Z | Z > z_0.75] = phi(0.6745) / 0.25 = 1.2711
    shift_global = _one_stage_shift(tmp_path, "global", keep=0.25)
    assert shift_global == pytest.approx(1.2711, abs=0.05)
    # Best per prompt, then the better half of those: larger than best-of-4 alone.
    shift_ltg = _one_stage_shift(tmp_path, "local_then_global", keep=0.5)
    assert shift_ltg > 1.0294 + 0.3


def test_nonfinite_rewards_are_counted_and_never_chosen(tmp_path):
    config = toy_config(tmp_path, run__stages=1, eval__every=0)

    def half_nan(xs, _p):
        return [x if i % 2 else math.nan for i, x in enumerate(xs)]

    records, run_dir = run_loop(config, GaussianAdapter(), reward_of(half_nan))
    assert records[-1]["n_nonfinite"] == 16
    chosen = [json.loads(line) for line in (run_dir.stages / "000001" / "chosen.jsonl").read_text().splitlines()]
    assert chosen and all(c["k_index"] % 2 == 1 for c in chosen)
    assert all(math.isfinite(c["reward"]) for c in chosen)


def test_all_nan_reward_is_an_error(tmp_path):
    config = toy_config(tmp_path, run__stages=1, eval__every=0)
    with pytest.raises(RewardError, match="no finite score"):
        run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: [math.nan] * len(xs)))


def test_wrong_number_of_scores_is_an_error(tmp_path):
    config = toy_config(tmp_path, run__stages=1, eval__every=0)
    with pytest.raises(RewardError, match="returned 3 scores"):
        run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: [1.0, 2.0, 3.0]))


def test_kl_shaped_ranking_holds_the_policy_back(tmp_path):
    shifts = {}
    for beta in (0.0, 2.0):
        config = toy_config(tmp_path, run__stages=3, run__name=f"b{beta}", selection__beta=beta, eval__every=0)
        adapter = GaussianAdapter()
        run_loop(config, adapter, reward_of(lambda xs, _p: list(xs)))
        shifts[beta] = float(adapter.mu.detach())
    assert shifts[2.0] < shifts[0.0] - 0.5


def _strip_times(records):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in records]


def test_resume_ends_like_an_uninterrupted_run(tmp_path):
    straight = GaussianAdapter()
    run_loop(toy_config(tmp_path / "a", run__stages=4), straight, reward_of(lambda xs, _p: [-abs(x - 3) for x in xs]))

    first = GaussianAdapter()
    run_loop(toy_config(tmp_path / "b", run__stages=2), first, reward_of(lambda xs, _p: [-abs(x - 3) for x in xs]))
    resumed = GaussianAdapter()  # a fresh process: nothing carried over but the run folder
    _, run_dir = run_loop(toy_config(tmp_path / "b", run__stages=4), resumed, reward_of(lambda xs, _p: [-abs(x - 3) for x in xs]), resume=True)

    assert float(resumed.mu.detach()) == float(straight.mu.detach())
    a = _strip_times(RunDir(tmp_path / "a" / "toy").read_metrics())
    b = _strip_times(run_dir.read_metrics())
    assert [r["stage"] for r in b] == [0, 1, 2, 3, 4]
    assert a == b


def test_metrics_are_repaired_after_a_crash(tmp_path):
    config = toy_config(tmp_path, run__stages=2)
    run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: list(xs)))
    run_dir = RunDir(tmp_path / "toy")
    # A crash after stage 2's metrics line but before its checkpoint landed, plus a torn line.
    import shutil

    shutil.rmtree(run_dir.checkpoint_dir(2))
    shutil.rmtree(run_dir.final)
    with open(run_dir.metrics, "a") as f:
        f.write('{"stage": 2, "reward_mean": 1.0}\n{"stage": 3, "rew')
    (run_dir.checkpoints / ".tmp-000002").mkdir()
    start = run_dir.prepare(resume=True, overwrite=False)
    assert start == 1
    assert [r["stage"] for r in run_dir.read_metrics()] == [0, 1]
    assert not (run_dir.checkpoints / ".tmp-000002").exists()


def test_a_finished_run_is_not_overwritten_silently(tmp_path):
    from raft_diffusion.core.run_dir import RunDirError

    config = toy_config(tmp_path, run__stages=1, eval__every=0)
    run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: list(xs)))
    with pytest.raises(RunDirError, match="finished run"):
        run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: list(xs)))
    run_dir = RunDir(tmp_path / "toy")
    assert run_dir.prepare(resume=False, overwrite=True) == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("toy.")]
    assert len(moved) == 1 and (moved[0] / "final" / "mu.json").exists()


def test_checkpoint_retention_keeps_the_newest(tmp_path):
    config = toy_config(tmp_path, run__stages=4, run__keep_checkpoints=2, eval__every=0)
    _, run_dir = run_loop(config, GaussianAdapter(), reward_of(lambda xs, _p: list(xs)))
    assert run_dir.completed_stages() == [3, 4]


def test_candidate_seeds_are_distinct_and_stable():
    seeds = candidate_seeds(0, 1, range(10), 4)
    assert len(set(seeds)) == 40
    assert seeds == candidate_seeds(0, 1, range(10), 4)
    assert seeds[8:12] == candidate_seeds(0, 1, [2], 4)  # a candidate's seed depends only on its own position
    assert set(seeds).isdisjoint(candidate_seeds(0, 2, range(10), 4))
    assert all(0 <= s < 2**63 for s in seeds)
