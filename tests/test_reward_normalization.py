"""Multi-reward normalisation (rewards[].normalize) and per-part held-out metrics."""

import pytest
import torch

from raft_diffusion.core.config import ConfigError, load_config
from raft_diffusion.core.loop import RaftLoop
from raft_diffusion.core.run_dir import RunDir
from raft_diffusion.core.stats import over_optimisation, summarize
from raft_diffusion.rewards import RewardError, WeightedReward, build_reward
from tests.toy import GaussianAdapter, toy_config

PARTS = [{"target": "tests.toy:big_up", "name": "big"}, {"target": "tests.toy:small_down", "name": "small", "weight": 2.0}]


def z(values):
    t = torch.tensor(values, dtype=torch.float64)
    return (t - t.mean()) / t.std(unbiased=False)


def test_stage_and_prompt_normalisation_before_weighting():
    xs, prompts = [0.0, 1.0, 2.0, 5.0, -1.0, 3.0], ["a", "a", "a", "b", "b", "b"]
    raw = build_reward(PARTS)
    assert torch.allclose(raw(xs, prompts), torch.tensor([998.0 * x for x in xs]))

    stage = build_reward([{**PARTS[0], "normalize": "stage"}, {**PARTS[1], "normalize": "stage"}])
    expected = z([1000 * x for x in xs]) + 2.0 * z([-x for x in xs])  # = -z(x): the weights decide, not the scales
    torch.testing.assert_close(stage(xs, prompts).double(), expected, rtol=0, atol=1e-6)

    prompt = build_reward([PARTS[0], {**PARTS[1], "normalize": "prompt"}])
    parts = prompt.score_parts(xs, prompts)
    normalized = prompt.normalized(parts, groups=prompts)
    torch.testing.assert_close(normalized["small"][:3].double(), z([0.0, -1.0, -2.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(normalized["small"][3:].double(), z([-5.0, 1.0, -3.0]), rtol=0, atol=1e-6)
    assert normalized["big"] is parts["big"]  # not normalised: summed as it is

    # A part without spread prefers nothing; non-finite scores stay non-finite.
    flat = WeightedReward([("c", 1.0, lambda o, p: [2.0] * len(o))], normalize={"c": "stage"})
    assert flat([1, 2, 3], ["a"] * 3).tolist() == [0.0, 0.0, 0.0]
    nan = WeightedReward([("n", 1.0, lambda o, p: [1.0, float("nan"), 3.0])], normalize={"n": "prompt"})
    got = nan([0, 0, 0], ["a"] * 3)
    assert got[0] == -1.0 and got[2] == 1.0 and got[1].isnan()
    # Fixed statistics instead of the outputs' own (held-out evaluations).
    ref = stage.combine(parts, reference={"big": (0.0, 1000.0), "small": (0.0, 0.5)})
    torch.testing.assert_close(ref, torch.tensor(xs) - 4.0 * torch.tensor(xs))
    with pytest.raises(RewardError, match="normalize must be one of none, stage, prompt"):
        WeightedReward([("a", 1.0, len)], normalize={"a": "batch"})


def test_normalize_in_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rewards:\n  - {name: brightness, normalize: off}\n  - {name: aesthetic, normalize: prompt}\n")
    config = load_config(path)
    assert [r["normalize"] for r in config.rewards] == ["none", "prompt"]
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.normalize: 'z' is not one of none, stage, prompt"):
        load_config(None, ["rewards=[{name: brightness, normalize: z}]"])
    with pytest.raises(ConfigError, match=r"eval.metrics\[0\]\.normalize: eval-only metrics are reported as they are"):
        load_config(None, ["eval.metrics=[{name: brightness, normalize: stage}]"])
    with pytest.raises(ConfigError, match="unknown config key 'rewards\\[0\\].normalise' \\(did you mean 'normalize'"):
        load_config(None, ["rewards=[{name: brightness, normalise: stage}]"])


def test_loop_logs_parts_raw_and_normalised_and_each_held_out(tmp_path):
    """Summed raw, the 1000x part decides every choice (up); z-scored, the doubled part does (down)."""
    results = {}
    for mode in ("none", "stage"):
        config = toy_config(tmp_path, run__name=mode, run__stages=2, guard__watch=["eval_reward_small"], guard__max_drop_se=100.0,
                            rewards=[{**PARTS[0], "normalize": mode}, {**PARTS[1], "normalize": mode}])
        run_dir = RunDir(f"{config.run.output_dir}/{config.run.name}")
        run_dir.prepare(resume=False, overwrite=False)
        reward = build_reward(config.rewards)
        loop = RaftLoop(config, GaussianAdapter(mu=0.0), reward, run_dir, log=lambda _m: None)
        results[mode] = loop.run(), run_dir
    raw, _ = results["none"]
    normed, run_dir = results["stage"]
    assert raw[-1]["reward_big_chosen_mean"] > raw[-1]["reward_big_mean"]  # big decides: x goes up
    assert normed[-1]["reward_small_chosen_mean"] > normed[-1]["reward_small_mean"]  # small decides: x goes down
    assert "reward_big_normalized_chosen_mean" in normed[-1] and "reward_big_normalized_chosen_mean" not in raw[-1]
    assert normed[-1]["reward_small_normalized_chosen_mean"] > 0 > normed[-1]["reward_big_normalized_chosen_mean"]

    # Held out: every part on its own scale, with its paired change; the total on the base model's scale.
    first, last = normed[0], normed[-1]
    assert first["eval_reward"] == pytest.approx(0.0, abs=1e-5)  # the base model is the reference
    assert last["eval_reward_small"] == pytest.approx(-last["eval_reward_big"] / 1000, rel=1e-5)
    assert last["eval_reward_small_change"] > 2 * last["eval_reward_small_change_sem"]
    assert last["eval_reward_big_change"] == pytest.approx(-1000 * last["eval_reward_small_change"], rel=1e-4)
    assert last["eval_reward_change"] > 0
    summary = summarize(normed)
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["reward_big"]["kind"] == "proxy part" and rows["reward_big"]["paired"]
    assert "reward_big" not in over_optimisation(summary)  # a part falling is not an eval-only metric falling
    with pytest.raises(ConfigError, match=r"guard.watch: 'eval_reward_tiny' is not a held-out metric of this run \(logged: eval_reward, eval_reward_big, eval_reward_small\)"):
        RaftLoop(toy_config(tmp_path, run__name="x", guard__watch=["eval_reward_tiny"], guard__max_drop_se=3.0, rewards=PARTS),
                 GaussianAdapter(), build_reward(PARTS), run_dir, log=lambda _m: None)
    rows0 = [line for line in (run_dir.stage_dir(0) / "eval_scores.jsonl").read_text().splitlines()]
    assert '"reward_big"' in rows0[0]


def test_one_normalised_reward_is_held_out_on_the_base_models_scale(tmp_path):
    config = toy_config(tmp_path, run__stages=2, rewards=[{**PARTS[0], "normalize": "prompt"}])
    run_dir = RunDir(f"{config.run.output_dir}/{config.run.name}")
    run_dir.prepare(resume=False, overwrite=False)
    records = RaftLoop(config, GaussianAdapter(mu=0.0), build_reward(config.rewards), run_dir, log=lambda _m: None).run()
    base, last = records[0], records[-1]
    assert base["eval_reward"] == pytest.approx(0.0, abs=1e-5)
    # the same affine map of the raw part at every evaluation: (1000 x - m0) / s0
    scale = (last["eval_reward_big"] - base["eval_reward_big"]) / (last["eval_reward"] - base["eval_reward"])
    assert last["eval_reward"] > 1.0 and scale == pytest.approx(last["eval_reward_big_change"] / last["eval_reward_change"], rel=1e-4)

