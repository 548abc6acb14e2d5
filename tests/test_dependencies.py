"""The dependency floors: the run-time check of the installed releases, weights loading in the dtype
asked for, and the packaged demo models loading whole (they were saved by newer releases).

``make test-min`` runs these, with the rest of the ``floor`` subset, at the floors of
tests/min-versions.txt."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
import torch

from raft_diffusion import cli, deps
from tests.test_diffusion_adapter import make_config as make_sd_config
from tests.test_diffusion_adapter import tiny_sd  # noqa: F401  (fixture)
from tests.test_llm_adapter import classifier_dir, lm_dir  # noqa: F401  (fixtures)
from tests.test_llm_adapter import make_adapter as make_llm_adapter
from tests.test_llm_adapter import make_config as make_llm_config

pytestmark = pytest.mark.floor

MIN_VERSIONS = Path(__file__).resolve().parent / "min-versions.txt"


@pytest.fixture
def fake_env(monkeypatch):
    """Replace the declared requirements and the installed versions that ``deps.check`` reads."""

    def install(declared: list[str], installed: dict[str, str | None]):
        monkeypatch.setattr(deps, "_declared", lambda: declared)
        monkeypatch.setattr(deps, "_installed", lambda name: installed.get(name, "99"))

    deps.check.cache_clear()
    yield install
    deps.check.cache_clear()


def test_a_dependency_below_its_floor_is_one_line_and_exit_2(fake_env, capsys):
    declared = metadata.requires("raft-diffusion")
    floor = next(r for r in declared if r.startswith("diffusers"))
    fake_env(declared, {"diffusers": "0.21.0"})
    assert cli.main(["report", "runs/nothing-here"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"error: diffusers 0.21.0 is installed; raft-diffusion needs {floor}: pip install '{floor}'")


def test_each_unmet_floor_is_named_and_the_rest_are_not(fake_env):
    declared = ["torch", "diffusers>=0.36", "peft>=0.18", "transformers>=5.1", "wandb>=1; extra == 'wandb'"]
    fake_env(declared, {"torch": "1.0", "diffusers": "0.40.0.dev0", "peft": None, "transformers": "5.0.0", "wandb": "0.1"})
    with pytest.raises(deps.DependencyError) as err:
        deps.check()
    assert str(err.value) == ("peft is not installed; transformers 5.0.0 is installed; raft-diffusion needs "
                              "peft>=0.18, transformers>=5.1: pip install 'peft>=0.18' 'transformers>=5.1'")
    fake_env(declared, {"diffusers": "0.40.0.dev0", "peft": "0.18.0", "transformers": "5.1.0"})
    deps.check()  # a development build of a newer release meets its floor


def test_the_installed_releases_meet_the_floors_and_min_versions_pins_exactly_the_floors():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    deps.check.cache_clear()
    deps.check()
    pins = {}
    for line in MIN_VERSIONS.read_text().splitlines():
        if line.split("#")[0].strip():
            (spec,) = Requirement(line.split("#")[0]).specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(Requirement(line.split("#")[0]).name)] = Version(spec.version)
    floors = [Requirement(r) for r in metadata.requires("raft-diffusion") if ">=" in r and "extra" not in r]
    assert len(floors) >= 5
    for req in floors:
        floor = Version(next(s.version for s in req.specifier if s.operator == ">="))
        assert pins.get(canonicalize_name(req.name)) == floor, f"{MIN_VERSIONS.name} does not pin {req} at its floor"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_pipeline_loads_in_the_dtype_asked_for(tiny_sd, dtype):  # noqa: F811
    from raft_diffusion.adapters.diffusion import load_pipeline

    config = make_sd_config(tiny_sd)
    pipe, _ = load_pipeline(config.model, config.adapter, dtype)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {dtype}


def test_the_language_and_reward_models_load_in_the_dtype_asked_for(lm_dir, classifier_dir):  # noqa: F811
    from raft_diffusion.rewards import build_reward

    adapter = make_llm_adapter(make_llm_config(lm_dir, model={"dtype": "bfloat16"}))
    frozen = {p.dtype for p in adapter.model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    reward = build_reward([{"name": "hf_reward_model", "args": {"model": classifier_dir, "dtype": "bfloat16"}}])
    assert reward.parts[0][2].model.dtype == torch.bfloat16


def test_the_packaged_demo_models_load_whole():
    """Every weight read from its file: a transformers release that does not know the newer checkpoint
    layout leaves modules at random init with only a log line."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, CLIPTextModel

    from aesthetic.loading import load_clip
    from raft_diffusion.assets import resolve
    from raft_diffusion.demo import world

    def read_whole(info) -> bool:
        return not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))

    for name, cls in (("llm", AutoModelForCausalLM), ("sentiment", AutoModelForSequenceClassification),
                      ("sd/text_encoder", CLIPTextModel)):
        _, info = cls.from_pretrained(resolve(f"demo:{name}"), output_loading_info=True)
        assert read_whole(info), f"demo:{name}: {info}"
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        _, info = cls.from_pretrained(resolve("demo:sd"), subfolder=sub, output_loading_info=True)
        assert read_whole(info), f"demo:sd/{sub}: {info}"

    for name in ("llm", "sentiment"):
        path = resolve(f"demo:{name}")
        tokenizer, raw = AutoTokenizer.from_pretrained(path), Tokenizer.from_file(f"{path}/tokenizer.json")
        assert tokenizer("the movie was good").input_ids == raw.encode("the movie was good").ids
    pipe_tokenizer = AutoTokenizer.from_pretrained(resolve("demo:sd/tokenizer"))
    for prompt in world.all_prompts()[:50]:
        assert len(pipe_tokenizer(prompt).input_ids) == len(prompt.split()) + 2  # one token per world word

    from safetensors.torch import load_file

    model, _, _ = load_clip(resolve("demo:clip/demo-clip.json"), resolve("demo:clip/open_clip_model.safetensors"))
    saved = load_file(resolve("demo:clip/open_clip_model.safetensors"))  # float16, loaded into float32
    torch.testing.assert_close(model.state_dict(), {k: v.float() for k, v in saved.items()}, rtol=0, atol=0)
