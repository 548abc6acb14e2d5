from pathlib import Path

import pytest

from raft_diffusion.core.config import ConfigError, from_dict, load_config, save_config
from raft_diffusion.core.prompts import PromptError, load_prompts, read_prompt_file, stage_prompts
from raft_diffusion.core.selection import select

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors

BASE = {"prompts": {"items": ["a cat"]}}


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  stages: 2\nsampling:\n  k: 3\nprompts:\n  items: [a, b]\n")
    config = load_config(path, ["run.stages=5", "diffusion.guidance_scale=3", "model.lora.targets=to_q,to_v", "train.lr=2e-5"])
    assert config.run.stages == 5 and config.sampling.k == 3
    assert config.adapter.guidance_scale == 3.0 and isinstance(config.adapter.guidance_scale, float)
    assert config.model.lora.targets == ["to_q", "to_v"]
    assert config.train.lr == pytest.approx(2e-5)
    saved = tmp_path / "saved.yaml"
    save_config(config, saved)
    assert load_config(saved) == config  # the resolved config written to a run folder reloads identically


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.nonsense=1"], "unknown config key 'run.nonsense'"),
        (["sampling.kk=3"], "did you mean 'k'"),
        (["sampling.k=three"], "sampling.k: expected an integer"),
        (["sampling.k=0"], "sampling.k must be >= 1"),
        (["diffusion.guidance_rescale=1.5"], "diffusion.guidance_rescale must be in [0, 1]"),
        (["selection.keep=0"], "selection.keep must be in (0, 1]"),
        (["selection.keep=1.5"], "selection.keep must be in (0, 1]"),
        (["run.stages=0"], "run.stages must be >= 1"),
        (["selection.strategy=best"], "selection.strategy: 'best' is not one of"),
        (["train.mixed_precision=fp8"], "train.mixed_precision"),
        (["diffusion.ddpm.timestep_bias_strategy=sooner"], "diffusion.ddpm.timestep_bias_strategy: 'sooner' is not one of"),
        (["diffusion.ddpm.timestep_bias_multiplier=-1"], "diffusion.ddpm.timestep_bias_multiplier must be >= 0"),
        (["diffusion.ddpm.timestep_bias_begin=500", "diffusion.ddpm.timestep_bias_end=500"], "diffusion.ddpm.timestep_bias_begin must be"),
        (["train.ema_decay=1"], "train.ema_decay must be in [0, 1)"),
        (["rewards=[{nam: aesthetic}]"], "unknown config key 'rewards[0].nam'"),
        (["rewards=[{weight: 2}]"], "needs 'name'"),
        (["diffusion.height=30"], "multiple of 8"),
        (["model.use_fast=true"], "unknown config key 'model.use_fast'"),
        (["run.save_images=maybe"], "run.save_images: expected true or false"),
        (["stages=3"], "unknown config key 'stages'"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompts.items=[a]", *overrides])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_reward_shorthands():
    config = from_dict({**BASE, "rewards": ["aesthetic", "mypkg.rewards:score"]})
    assert config.rewards[0]["name"] == "aesthetic" and config.rewards[1]["target"] == "mypkg.rewards:score"
    assert all(spec["weight"] == 1.0 and spec["args"] == {} for spec in config.rewards)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# animals\na cat\n\n  a dog  \n")
    assert read_prompt_file(txt) == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "x"}\n\n{"prompt": "y", "id": 2}\n')
    assert read_prompt_file(jsonl) == ["x", "y"]
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(PromptError, match="bad.jsonl:1"):
        read_prompt_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(PromptError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8"):
        read_prompt_file(tmp_path / "latin1.txt")
    with pytest.raises(PromptError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_builtin_prompt_sets():
    config = from_dict({"prompts": {"builtin": "cifar10", "eval_builtin": "simple_animals"}})
    train, held_out = load_prompts(config.prompts)
    assert len(train) == 10 and "airplane" in train
    assert len(held_out) == 45 and len(set(held_out)) == 45
    with pytest.raises(PromptError, match="did you mean 'cifar10'"):
        load_prompts(from_dict({"prompts": {"builtin": "cifar"}}).prompts)


def test_stage_prompts_cover_every_prompt_each_epoch():
    prompts = [f"p{i}" for i in range(10)]
    drawn = stage_prompts(prompts, 5, seed=1, stage=1) + stage_prompts(prompts, 5, seed=1, stage=2)  # stages count from 1
    assert sorted(drawn) == sorted(prompts)
    assert stage_prompts(prompts, 5, seed=1, stage=3) == stage_prompts(prompts, 5, seed=1, stage=3)
    assert stage_prompts(prompts, 3, seed=0, stage=1, shuffle=False) == ["p0", "p1", "p2"]
    assert stage_prompts(prompts, 3, seed=0, stage=4, shuffle=False) == ["p9", "p0", "p1"]


def test_selection_strategies():
    import torch

    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [2.0, 1.0, float("nan"), 0.0], [0.5, 0.5, 0.5, 0.5]])
    assert select(scores, "local", 0.25) == [4, 1, 8]  # best of each prompt, best first; tie -> lowest index
    assert select(scores, "local", 0.5) == [4, 5, 1, 2, 8, 9]
    assert select(scores, "global", 0.25) == [4, 5, 1]
    assert select(scores, "local_then_global", 0.67) == [4, 1]
    all_nan = torch.full((2, 2), float("nan"))
    assert select(all_nan, "local", 0.5) == [] and select(all_nan, "global", 1.0) == []


def test_overrides_reach_list_entries_by_index():
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", ["rewards.0.args.pretrained=/weights/clip.bin", "eval.metrics.1.weight=2",
                                               "model.lora.targets=[to_q, to_v]", "model.lora.targets.1=to_k"])
    assert config.rewards[0]["args"] == {"clip": "demo", "pretrained": "/weights/clip.bin"}
    assert [m["weight"] for m in config.eval.metrics] == [1.0, 2.0]
    assert config.model.lora.targets == ["to_q", "to_k"]
    # A list the YAML does not set starts from its default; a shorthand entry becomes a mapping.
    assert load_config(None, ["prompts.items=[a]", "rewards.0.args.clip=demo"]).rewards[0]["args"] == {"clip": "demo"}
    shorthand = load_config(None, ["prompts.items=[a]", "rewards=[brightness]", "rewards.0.weight=3"]).rewards
    assert shorthand == [{"name": "brightness", "weight": 3.0, "args": {}}]


@pytest.mark.parametrize(
    "override, message",
    [
        ("rewards.1.args.clip=demo", "rewards.1 is out of range, rewards has 1 entry (index 0)"),
        ("eval.metrics.2.weight=2", "eval.metrics.2 is out of range, eval.metrics has 2 entries (indexes 0-1)"),
        ("prompts.eval_items.0=a", "prompts.eval_items.0 is out of range, prompts.eval_items has no entries"),
        ("rewards.args.clip=demo", "rewards is a list; name an entry by its index, e.g. rewards.0"),
        ("run.name.x=1", "run.name is a value"),
    ],
)
def test_bad_index_paths_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompts.items=[a]", override])
    assert message in str(info.value) and override in str(info.value) and "\n" not in str(info.value)


def test_yaml_booleans_read_back_as_the_choice_typed(tmp_path):
    # YAML 1.1 reads `no` as false: mixed_precision's documented value must still be accepted.
    assert load_config(None, ["prompts.items=[a]", "train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nprompts:\n  items: [a]\n")
    assert load_config(path).train.mixed_precision == "no"
    # Where the word cannot be known (`on` or `yes`?), the message says to quote it.
    with pytest.raises(ConfigError) as info:
        load_config(None, ["prompts.items=[a]", "run.name=on"])
    assert "run.name" in str(info.value) and "quote" in str(info.value) and "\n" not in str(info.value)
    assert load_config(None, ["prompts.items=[a]", "run.name='on'"]).run.name == "on"
    with pytest.raises(ConfigError, match="train.mixed_precision: 'yes' is not one of"):
        load_config(None, ["prompts.items=[a]", "train.mixed_precision='yes'"])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_guard_names_logged_metrics(path):
    config = load_config(path, [])
    logged = {"eval_reward", *(f"eval_{m['name']}" for m in config.eval.metrics)}
    for name in [config.guard.metric, *config.guard.watch]:
        assert not name or name in logged, f"{path.name}: guard names {name}, which the run does not log"


def test_the_default_config_follows_the_adapter_kind():
    from raft_diffusion.core.config import default_config_path

    for overrides, kind in (([], "diffusion"), (["run.stages=2"], "diffusion"), (["model.kind=llm"], "llm"),
                            (["model.kind = llm", "run.seed=1"], "llm"), (["model.kind=llm", "model.kind=diffusion"], "diffusion")):
        path = default_config_path(overrides)
        assert load_config(path).model.kind == kind, (overrides, path)
