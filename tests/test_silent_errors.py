"""No silent wrong results: what a run exports loads whole, a diverging run stops, prompts keep their
commas, one run per folder, a resumed run is still one run, and every user mistake is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raft_diffusion.cli import main
from tests.sd_fixtures import build_tiny_sd, load_lora_collecting_messages

DEMO_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # configs/demo.yaml


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def demo_sd():
    """The packaged demo model (12 MB): the one whose mixed-naming LoRA diffusers loaded only in part."""
    from raft_diffusion.assets import resolve

    return resolve("demo:sd")


def make_adapter(model_path: str, text_encoder: bool = False, **lora):
    from accelerate import Accelerator

    from raft_diffusion.adapters.diffusion import DiffusionAdapter
    from raft_diffusion.core.config import from_dict

    config = from_dict({
        "model": {"pretrained": model_path, "lora": {"rank": 4, "alpha": 2.0, **lora}},
        "diffusion": {"steps": 3, "guidance_scale": 2.0, "height": 32, "width": 32, "text_encoder_lora": text_encoder},
        "sampling": {"batch_size": 4},
        "train": {"steps_per_stage": 2, "batch_size": 2, "lr": 1e-2},
    })
    return DiffusionAdapter(config, Accelerator(cpu=True))


def lora_layers(module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(m, LoraLayer) for m in module.modules())


# ---------------------------------------------------------------------------------------------
# The exported LoRA loads whole


def test_demo_targets_export_loads_whole_in_a_stock_pipeline(demo_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    adapter = make_adapter(demo_sd, targets=DEMO_TARGETS, text_encoder=True)
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    adapter.finetune(adapter.generate(prompts, 1, seeds))
    held_out = adapter.generate(prompts, 1, seeds)
    adapter.export(tmp_path / "lora")
    tensors = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    convs = [k for k in tensors if ".conv1." in k or ".conv2." in k]
    assert convs and len(convs) < len(tensors)  # attention, convolutions and the text encoder, in one file

    pipe = StableDiffusionPipeline.from_pretrained(demo_sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    messages = load_lora_collecting_messages(pipe, tmp_path / "lora")
    assert not [m for m in messages if "inconsistency" in m or "unexpected" in m.lower()], messages
    assert lora_layers(pipe.unet) + lora_layers(pipe.text_encoder) == len(tensors) // 2  # every layer the file holds
    stock = pipe(prompts, num_inference_steps=3, height=32, width=32, guidance_scale=2.0, output_type="latent",
                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    torch.testing.assert_close(stock, torch.stack([c.payload["latents"] for c in held_out]), atol=1e-5, rtol=1e-5)


def test_a_lora_diffusers_loads_only_in_part_is_refused_in_one_line(demo_sd, tmp_path):
    """A file in the mixed naming older exports wrote: diffusers would drop its attention layers."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file, save_file

    from raft_diffusion.adapters.diffusion import LoraError, load_lora

    adapter = make_adapter(demo_sd, targets=DEMO_TARGETS)
    adapter.export(tmp_path / "lora")
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    unet = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    save_file({f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(unet).items()}, str(path), metadata=metadata)
    pipe = StableDiffusionPipeline.from_pretrained(demo_sd, safety_checker=None)
    with pytest.raises(LoraError) as err:
        load_lora(pipe, str(tmp_path / "lora"))
    assert "\n" not in str(err.value) and "loaded 32 of its 96 tensors" in str(err.value)


# ---------------------------------------------------------------------------------------------
# A diverging run stops before the update and resumes after a fix


@pytest.fixture(scope="module")
def random_sd(tmp_path_factory):
    from scripts.demo.random_sd import build_random_sd

    return str(build_random_sd(tmp_path_factory.mktemp("random_sd")))


def small_run(model: str, out, *extra: str) -> list[str]:
    return [
        "train", f"model.pretrained={model}", f"run.output_dir={out}", "run.name=r", "run.stages=1",
        "sampling.k=2", "sampling.prompts_per_stage=2", "diffusion.steps=2", "diffusion.guidance_scale=1",
        "train.steps_per_stage=2", "train.batch_size=1", "eval.every=0", "eval.metrics=[]", "log.report=false",
        "prompts.items=[a red circle, a blue square]", "rewards=[{target: 'tests.plugins:brightness'}]", *extra,
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_a_diverging_run_stops_before_the_update_and_resumes_after_a_fix(random_sd, tmp_path, capsys):
    from safetensors.torch import load_file

    from raft_diffusion.core.run_dir import RunDir

    run = RunDir(tmp_path / "r")
    assert main(small_run(random_sd, tmp_path, "run.stages=2", "train.lr=1e6", "train.steps_per_stage=4")) == 2
    err = one_line_error(capsys)
    assert "non-finite" in err and "train.lr" in err and "--resume" in err
    assert not run.final.exists() and run.completed_stages() == []
    assert (run.stages / "000001" / "diverged.json").is_file()

    assert main(small_run(random_sd, tmp_path, "run.stages=2", "train.lr=1e-3", "train.steps_per_stage=4", "--resume")) == 0
    assert [r["stage"] for r in run.read_metrics()] == [1, 2]
    weights = load_file(str(run.final / "pytorch_lora_weights.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())


def _finetuner(lr: float, tmp_path, **train):
    from accelerate import Accelerator

    from raft_diffusion.adapters.training import Finetuner
    from raft_diffusion.core.config import from_dict

    config = from_dict({"train": {"lr": lr, "steps_per_stage": 3, "batch_size": 2, **train}})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    data = torch.randn(8, 4)
    finetuner = Finetuner(Accelerator(cpu=True), {"model": model}, config, seed=0)
    return finetuner, model, lambda idx, mine: model(data[idx][mine]).pow(2).mean()


def test_a_non_finite_loss_is_never_applied_and_a_resume_takes_the_new_rate(tmp_path):
    from raft_diffusion.core.errors import DivergedError, UserError

    finetuner, model, loss = _finetuner(1e-2, tmp_path)
    finetuner.fit(8, loss)
    finetuner.save(tmp_path / "good")
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DivergedError) as err:
        finetuner.fit(8, lambda idx, mine: loss(idx, mine) * float("nan"))
    assert isinstance(err.value, UserError) and "train.lr" in str(err.value)
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())  # the update was not made

    resumed, _, _ = _finetuner(1e-4, tmp_path)
    resumed.load(tmp_path / "good")
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [1e-4]


# ---------------------------------------------------------------------------------------------
# Prompts keep their commas


def test_prompts_with_commas_are_never_split(tmp_path):
    from raft_diffusion.core.config import load_config

    def items(*overrides, path=None):
        return load_config(path, list(overrides)).prompts.items

    assert items("prompts.items=a cat, sitting on a mat") == ["a cat, sitting on a mat"]
    assert items('prompts.items=["a, b", "c"]') == ["a, b", "c"]
    assert items("prompts.items=[a cat, a dog]") == ["a cat", "a dog"]  # YAML's own flow list
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text('prompts:\n  items: "a cat, sitting on a mat"\n')
    assert items(path=yaml_file) == ["a cat, sitting on a mat"]
    assert load_config(None, ["model.kind=llm", "llm.stop=a, b"]).adapter.stop == ["a, b"]
    # names cannot hold a comma: the shorthand stays where it is safe
    assert load_config(None, ["model.lora.targets=to_q, to_v"]).model.lora.targets == ["to_q", "to_v"]


@pytest.mark.parametrize("name", [".", "..", "a/b", "..\\\\x", "", " "])
def test_run_name_is_one_plain_folder_name(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", f"run.name={name}", "run.output_dir=runs", "--overwrite"]) == 2
    assert "run.name" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_guard_watch_needs_max_drop_se(capsys):
    assert main(["train", "guard.watch=[eval_reward]", "prompts.eval_builtin=demo_eval"]) == 2
    assert "guard.max_drop_se" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# One run per folder, and a resumed run is still one run


def test_a_folder_in_use_is_refused_naming_the_process_and_a_dead_ones_lock_is_taken_over(random_sd, tmp_path, capsys):
    import os
    import subprocess
    import sys

    from raft_diffusion.core.run_dir import RunDir

    holder = RunDir(tmp_path / "r")
    holder.lock()  # a run in progress (this process: flock is per open file, as between two processes)
    assert main(small_run(random_sd, tmp_path, "--resume")) == 2
    err = one_line_error(capsys)
    assert f"in use by another run (process {os.getpid()})" in err
    assert sorted(p.name for p in holder.root.iterdir()) == ["run.lock"]  # nothing else was written
    holder.unlock()

    # A run killed while holding the folder: its lock goes with its process.
    code = f"from raft_diffusion.core.run_dir import RunDir; import os, signal; RunDir({str(holder.root)!r}).lock(); os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == -9
    assert main(small_run(random_sd, tmp_path, "--resume")) == 0


def test_a_resume_refuses_changes_to_what_defines_the_results_and_records_the_others(random_sd, tmp_path, capsys):
    import json

    from raft_diffusion.core.run_dir import RunDir

    run = RunDir(tmp_path / "r")
    assert main(small_run(random_sd, tmp_path)) == 0
    config = run.config.read_text()
    assert main(small_run(random_sd, tmp_path, "run.seed=1", "train.lr=1e-3", "--resume")) == 2
    err = one_line_error(capsys)
    assert "run.seed (0 -> 1)" in err and "train.lr" in err and "sampling" not in err
    assert main(small_run(random_sd, tmp_path, "rewards=[{target: 'tests.plugins:brightness', weight: 2}]", "--resume")) == 2
    assert "rewards" in one_line_error(capsys)

    assert main(small_run(random_sd, tmp_path, "run.stages=2", "log.tensorboard=false", "--resume")) == 0
    assert [r["stage"] for r in run.read_metrics()] == [1, 2] and run.config.read_text() == config
    (change,) = [json.loads(line) for line in run.config_changes.read_text().splitlines()]
    assert change["after_stage"] == 1 and change["changes"] == {"log.tensorboard": [True, False], "run.stages": [1, 2]}
    capsys.readouterr()
    assert main(small_run(random_sd, tmp_path, "--resume")) == 2  # run.stages is 2 now: it may only rise
    assert "run.stages (2 -> 1)" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Every user mistake is a UserError: the command line's one line, exit 2

# Functions whose bare ValueError is a programming error of the caller, not a user's mistake (the
# loop validates what reaches them): kept short, each reviewed.
INTERNAL_VALUE_ERRORS = {
    "generate": "seeds that do not match prompts x k: the loop derives them",
    "finetune": "no chosen candidates: the loop always chooses at least one",
    "log_ratio": "called without recorded trajectories: the loop calls it only with selection.beta > 0",
    "denoising_loss": "a tensor where a dict of conditioning is needed: a caller's mistake",
    "_check_accelerator": "an Accelerator built with another grad_accum than the config's: the recipe builds it",
}


def test_user_input_never_raises_a_bare_value_error():
    """Walks the adapters, rewards, command line and recipe for `raise ValueError(...)`."""
    import ast
    from pathlib import Path

    from raft_diffusion import cli

    root = Path(cli.__file__).parent
    files = [*root.glob("adapters/**/*.py"), *root.glob("rewards/**/*.py"),
             *(root / name for name in ("cli.py", "recipe.py", "api.py", "sampling.py", "scoring.py"))]
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.Raise) and node.exc is not None:
                    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                    if isinstance(exc, ast.Name) and exc.id == "ValueError" and func.name not in INTERNAL_VALUE_ERRORS:
                        found.append(f"{path.relative_to(root)}:{node.lineno} in {func.name}")
    assert not found, f"raise a UserError subclass on user input: {found}"


def test_every_user_error_class_is_a_user_error():
    import aesthetic
    from aesthetic.loading import AestheticError
    from raft_diffusion import assets, deps, hub, sampling, scoring
    from raft_diffusion.adapters import training
    from raft_diffusion.adapters.diffusion import loading as diffusion_loading
    from raft_diffusion.core import config, plugins, prompts, protocols, run_dir
    from raft_diffusion.core.errors import DivergedError, UserError

    for cls in (config.ConfigError, prompts.PromptError, run_dir.RunDirError, protocols.RewardError, plugins.PluginError,
                sampling.SampleError, scoring.ScoreError, diffusion_loading.LoraError,
                diffusion_loading.UnsupportedModelError, diffusion_loading.ModelNotFoundError, hub.ModelNotFoundError, assets.MissingAssetError, deps.DependencyError,
                training.CheckpointMismatchError, DivergedError):
        assert issubclass(cls, UserError), cls
    for cls in (aesthetic.WeightsNotFoundError, aesthetic.ClipConfigError, aesthetic.HeadError):
        assert issubclass(cls, AestheticError), cls


def test_an_llm_prompt_longer_than_the_context_is_one_line(tmp_path, capsys):
    from tests.lm_fixtures import build_tiny_lm

    lm = build_tiny_lm(tmp_path / "lm")
    capsys.readouterr()
    long_prompt = " ".join(["word"] * 80)
    code = main(["train", "model.kind=llm", f"model.pretrained={lm}", "model.lora.targets=[]", f"run.output_dir={tmp_path}",
                 "run.stages=1", "sampling.k=2", "sampling.prompts_per_stage=1", "llm.max_new_tokens=4",
                 f"prompts.items=[{long_prompt}]", "eval.every=0", "eval.metrics=[]", "log.report=false",
                 "rewards=[{target: 'tests.plugins:good_count_with_marker'}]"])
    assert code == 2
    assert "exceeds the model's context" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# Reward values


@pytest.mark.parametrize("values", [
    [1, 2.5, 3], (1.0, 2.0, 3.0), np.array([1.0, 2.5, 3.0]), np.array([[1.0], [2.5], [3.0]]), np.array([1, 2, 3]),
    torch.tensor([1.0, 2.5, 3.0]), torch.tensor([[1.0], [2.5], [3.0]]), [np.float32(1), torch.tensor(2.5), 3],
], ids=["list", "tuple", "array", "array-n1", "int-array", "tensor", "tensor-n1", "mixed-scalars"])
def test_reward_values_that_are_n_numbers_are_accepted(values):
    from raft_diffusion.core.scores import to_scores

    assert to_scores(values, 3, "r").shape == (3,)


@pytest.mark.parametrize("values, words", [
    ({"a": 1.0, "b": 2.0, "c": 3.0}, "returned dict"),
    (["1.0", "2.0", "3.0"], "non-numeric scores (str)"),
    ("123", "returned str"),
    (np.ones((3, 2)), "ndarray of shape (3, 2)"),
    (torch.ones(3, 2), "Tensor of shape (3, 2)"),
    (np.array(["1", "2", "3"]), "array of <U1 with shape (3,)"),
    ([1.0, 2.0], "returned 2 scores for 3 outputs"),
    (None, "returned NoneType"),
], ids=["dict", "numeric-strings", "string", "array-n2", "tensor-n2", "string-array", "too-few", "none"])
def test_other_reward_values_are_one_line_naming_type_and_shape(values, words):
    from raft_diffusion.core.protocols import RewardError
    from raft_diffusion.core.scores import to_scores

    with pytest.raises(RewardError) as err:
        to_scores(values, 3, "r")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_printed_resume_command_is_shell_quoted(random_sd, tmp_path, capsys):
    import shlex

    args = small_run(random_sd, tmp_path, "rewards=[{target: 'tests.plugins:interrupt'}]")[1:]
    assert main(["train", *args]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    command = err.split("is resumable: ", 1)[1]
    assert shlex.split(command) == ["raft-diffusion", "train", *args, "--resume"]


def test_a_lora_rank_no_layer_can_reach_is_refused(random_sd, tmp_path, capsys):
    args = small_run(random_sd, tmp_path, "model.lora.rank=4096", "model.lora.targets=[to_q, to_k, to_v, to_out.0, conv1, conv2]")
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "model.lora.rank 4096 is above what unet." in err and "use model.lora.rank <= 32" in err
    assert not (tmp_path / "r" / "final").exists()


@pytest.mark.parametrize("device, words", [("cuda:7", "model.device: cuda:7 is not available"), ("gpu", "is not a device")])
def test_a_device_this_machine_lacks_is_one_line_before_any_model_loads(device, words, tmp_path, capsys, monkeypatch):
    import raft_diffusion.adapters as adapters

    monkeypatch.setattr(adapters, "build_adapter", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["train", f"model.device={device}", f"run.output_dir={tmp_path}"]) == 2
    assert words in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [("{clip: demo, dtype: fp12}", "unknown dtype 'fp12'"),
                                         ("{clip: demo, batch_size: 0}", "batch_size must be >= 1")])
def test_bad_reward_arguments_are_one_line(args, words, tmp_path, capsys):
    assert main(["train", f"rewards=[{{name: aesthetic, args: {args}}}]", f"run.output_dir={tmp_path}"]) == 2
    assert words in one_line_error(capsys)
