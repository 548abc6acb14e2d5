"""The Python API and the plug-in paths a new user takes: train() with a function as the reward,
@register_reward on a plain function, `imports` / `--import`, modules beside the config, built-ins
without installed entry points."""

import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from raft_diffusion.cli import main
from raft_diffusion.core import plugins
from raft_diffusion.core.config import ConfigError, default_config_path, from_dict, load_config
from raft_diffusion.rewards import RewardError, build_reward, register_reward

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_trains_with_a_reward_function(tmp_path):
    import raft_diffusion
    from examples import python_api

    assert inspect.isfunction(raft_diffusion.train) and raft_diffusion.train.__module__ == "raft_diffusion.api"
    run = python_api.main(str(tmp_path))
    assert run.folder == (tmp_path / "python_api").resolve()
    assert [r["stage"] for r in run.metrics] == [0, 1, 2]
    assert all(-1 <= r["eval_reward"] <= 1 for r in run.metrics) and "train_loss" in run.metrics[-1]
    assert run.exported_stage in (1, 2) and (run.final / "pytorch_lora_weights.safetensors").is_file()
    # The function is named by an importable target, so the run folder's config resumes from the command line.
    saved = yaml.safe_load((run.folder / "config.yaml").read_text())
    assert [spec["target"] for spec in saved["rewards"]] == ["examples.python_api:redness"]
    assert saved["run"]["stages"] == 2 and saved["diffusion"]["steps"] == 4


def test_rewards_as_functions_names_and_specs(tmp_path):
    from raft_diffusion.api import _reward_spec

    def local_brightness(outputs, prompts):
        return [1.0] * len(outputs)

    spec = _reward_spec(local_brightness, "rewards[0]")
    assert spec == {"name": "local_brightness"}  # not importable: registered in this process
    assert build_reward([spec]).parts[0][0] == "local_brightness"
    assert _reward_spec({"target": local_brightness, "weight": 2.0}, "rewards[0]") == {"name": "local_brightness", "weight": 2.0}

    class Darkness:  # a callable object: named after its class
        def __call__(self, outputs, prompts):
            return [-1.0] * len(outputs)

    assert _reward_spec({"target": Darkness(), "name": "dark"}, "rewards[1]") == {"name": "dark"}
    assert _reward_spec(Darkness(), "rewards[1]") == {"name": "Darkness"}
    assert build_reward([{"name": "dark"}])(["x"], ["p"]).tolist() == [-1.0]
    assert _reward_spec("brightness", "rewards[0]") == "brightness"

    def brightness(outputs, prompts):
        return [0.0] * len(outputs)

    with pytest.raises(ConfigError, match="'brightness' has the name of another reward"):
        _reward_spec(brightness, "rewards[0]")
    with pytest.raises(ConfigError, match="needs a name"):
        _reward_spec(lambda outputs, prompts: [0.0], "rewards[0]")


def test_register_reward_on_a_plain_function_and_on_a_factory():
    @register_reward
    def api_test_redness(outputs, prompts, scale=1.0):
        return [scale * len(p) for p in prompts]

    @register_reward("api_test_scaled", factory=True)
    def make_scaled(factor):
        return lambda outputs, prompts: [factor] * len(outputs)

    assert api_test_redness(None, ["ab"]) == [2.0]  # the decorator returns the function itself
    reward = build_reward([{"name": "api_test_redness"}, {"name": "api_test_redness", "args": {"scale": 3.0}, "weight": 0.5},
                           {"name": "api_test_scaled", "args": {"factor": 4.0}}])
    plain, with_args, from_factory = (fn for _, _, fn in reward.parts)
    assert plain(["x"], ["abc"]) == [3.0] and with_args(["x"], ["abc"]) == [9.0]
    assert from_factory(["x", "y"], ["a", "b"]) == [4.0, 4.0]
    with pytest.raises(RewardError, match=r"api_test_redness.*bad args \['colour'\]"):
        build_reward([{"name": "api_test_redness", "args": {"colour": "red"}}])
    with pytest.raises(RewardError, match="api_test_scaled.*bad args"):
        build_reward([{"name": "api_test_scaled"}])


def _module(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_imports_and_targets_beside_the_config_are_found_from_any_folder(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    _module(project, "api_test_beside", """
        from raft_diffusion.rewards import register_reward

        @register_reward
        def api_test_beside_registered(outputs, prompts):
            return [1.0] * len(outputs)

        def plain(outputs, prompts):
            return [2.0] * len(outputs)
    """)
    config_path = project / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "imports": ["api_test_beside"],
        "rewards": [{"name": "api_test_beside_registered"}, {"target": "api_test_beside:plain"}],
        "prompts": {"items": ["a"]},
    }))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the config's folder is added to a copy
    config = load_config(config_path)
    assert config.imports == ["api_test_beside"]
    assert build_reward(config.rewards)(["x"], ["a"]).tolist() == [3.0]
    with pytest.raises(ConfigError, match=r"^imports\[1\]: cannot import module 'api_test_no_such_module'"):
        load_config(config_path, imports=["api_test_no_such_module"])


def test_the_command_line_imports_modules_before_the_config_is_read(tmp_path, monkeypatch, capsys):
    _module(tmp_path / "mods", "api_test_cli_rewards", """
        from raft_diffusion.rewards import register_reward

        @register_reward
        def api_test_near_origin(points, prompts):
            return [-(x * x + y * y) ** 0.5 for x, y in points]
    """)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    small = ["--config", "examples/point_flow.yaml", f"run.output_dir={tmp_path}", "run.stages=1",
             "rewards=[api_test_near_origin]", "train.steps_per_stage=2", "eval.k=4", "--quiet"]
    assert main(["train", *small]) == 2
    assert "unknown reward 'api_test_near_origin'" in capsys.readouterr().err
    assert main(["train", "--import", "api_test_cli_rewards", *small]) == 0
    saved = yaml.safe_load((tmp_path / "point_flow" / "config.yaml").read_text())
    assert saved["imports"] == ["api_test_cli_rewards"] and saved["rewards"][0]["name"] == "api_test_near_origin"
    assert main(["train", "--import", "api_test_no_such_module", *small, "--overwrite"]) == 2
    assert "imports[0]: cannot import module 'api_test_no_such_module'" in capsys.readouterr().err


def test_built_ins_need_no_installed_entry_points(monkeypatch):
    """A checkout run with PYTHONPATH=. has no entry points: the built-ins come from the package itself."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    monkeypatch.setattr(plugins, "_entry_points", lambda kind: {})
    for kind in plugins.KINDS:
        for name, target in plugins._BUILTIN[kind].items():
            assert f'{name} = "{target}"' not in pyproject
            assert plugins.find(kind, name) is not None
    assert load_config(None).model.kind == "diffusion"
    assert load_config(None, ["model.kind=llm"]).model.kind == "llm"


def test_load_config_without_a_path_is_the_command_lines_default():
    assert load_config(None).to_dict() == load_config(default_config_path()).to_dict()
    assert load_config(None).to_dict() != from_dict({}).to_dict()  # the bare dataclass defaults
