"""`accelerate launch` with 2 CPU processes (gloo) equals one process with the same global batch,
for both adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.demo.random_sd import build_random_sd
from tests.lm_fixtures import build_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


def one_and_two_processes(tmp_path, common, one_batch, port):
    """Run ``common`` in one process with ``one_batch`` and under ``accelerate launch`` on 2 CPU processes
    with half of it; return the two run folders."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "raft_diffusion.cli", "train", *common, "run.name=run", f"run.output_dir={tmp_path / 'one'}", f"train.batch_size={one_batch}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    two = subprocess.run(
        [*launcher, str(ROOT / "scripts" / "train.py"), *common, "run.name=run", f"run.output_dir={tmp_path / 'two'}", f"train.batch_size={one_batch // 2}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    return tmp_path / "one" / "run", tmp_path / "two" / "run"


def assert_same_run(one: Path, two: Path, weights_file: str, trained_key: str, atol: float = 1e-5) -> None:
    a, b = load_file(str(one / "final" / weights_file)), load_file(str(two / "final" / weights_file))
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if trained_key in k)
    assert moved > 1e-3  # training did something, so equality below means something
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4)
    lines = {run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)}
    assert [r["stage"] for r in lines[two]] == [0, 1, 2]  # written once, by the main process
    for r1, r2 in zip(lines[one], lines[two]):
        # the diversity metrics too: over every process's candidates
        for key in ("reward_mean", "reward_chosen_mean", "eval_reward", "train_loss", "diversity", "eval_diversity", "distinct_2", "eval_distinct_2"):
            if key in r1:
                assert abs(r1[key] - r2[key]) < 1e-4, key
    assert "train_loss" in lines[two][-1]
    ckpt = two / "checkpoints" / "000002"
    assert (ckpt / "random_states_0.pkl").exists() and (ckpt / "random_states_1.pkl").exists()


def test_two_processes_equal_one(tmp_path):
    sd = build_random_sd(tmp_path / "sd")
    common = [
        f"model.pretrained={sd}", "model.device=cpu", "run.stages=2",
        "sampling.k=2", "sampling.prompts_per_stage=4", "diffusion.steps=3", "diffusion.guidance_scale=2",
        # A recipe of its own, not the demo's: the equality below is measured at this scale of change.
        "model.lora.targets=[to_q,to_k,to_v,to_out.0]", "train.lr=2e-4", "diffusion.caption_dropout=0.3",
        "diffusion.ddpm.timestep_bias_strategy=none",
        "train.steps_per_stage=3", "eval.every=1", "eval.k=1", "eval.metrics=[]", "log.report=false",
        "prompts.items=[a red circle, a blue square, a green cross, a white triangle, a purple cross]",
        "prompts.eval_items=[a red square, a blue circle]", "rewards=tests.plugins:brightness", "--quiet",
    ]
    one, two = one_and_two_processes(tmp_path, common, one_batch=4, port=29533)
    assert_same_run(one, two, "pytorch_lora_weights.safetensors", "lora_B")


def test_llm_two_processes_equal_one(tmp_path):
    lm = build_tiny_lm(tmp_path / "lm", dropout=0.0)  # dropout masks are drawn per process: no equality with them
    common = [
        "model.kind=llm", f"model.pretrained={lm}", "model.device=cpu", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[]",
        "run.stages=2", "run.save_images=false", "sampling.k=2", "sampling.prompts_per_stage=4", "llm.max_new_tokens=6",
        "train.steps_per_stage=3", "train.lr=0.01", "train.grad_accum=2", "eval.every=1", "eval.k=2", "eval.metrics=[]", "log.report=false",
        "prompts.items=[the movie was, a pizza is, the phone was, it was]", "prompts.eval_items=[a movie is]",
        "rewards=[{name: word_count, args: {words: good}}]", "--quiet",
    ]
    # Responses differ in length: equality needs every token to weigh the same on both sides.
    one, two = one_and_two_processes(tmp_path, common, one_batch=4, port=29534)
    assert_same_run(one, two, "adapter_model.safetensors", "lora_B")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_two_processes_equal_one(family, tmp_path):
    """A 2-stage run with a user's reward on a tiny SD3 / FLUX.1 folder, in one process and in two."""
    from scripts.demo.random_flow import build_flux, build_sd3

    folder = (build_sd3 if family == "sd3" else build_flux)(tmp_path / family)
    (tmp_path / "flow.yaml").write_text("model:\n  kind: diffusion\n")  # the defaults, not the demo's recipe
    common = [
        "--config", str(tmp_path / "flow.yaml"), f"model.pretrained={folder}", "model.device=cpu", "run.stages=2",
        "sampling.k=2", "sampling.prompts_per_stage=4", "diffusion.steps=3", "diffusion.height=16", "diffusion.width=16",
        "diffusion.max_sequence_length=16", "train.lr=2e-3", "train.steps_per_stage=3", "eval.every=1", "eval.k=1",
        "eval.metrics=[]", "log.report=false", "rewards=tests.plugins:brightness", "--quiet",
        "prompts.items=[a red circle, a blue square, a green cross, a white triangle, a purple cross]",
        "prompts.eval_items=[a red square, a blue circle]",
    ]
    one, two = one_and_two_processes(tmp_path, common, one_batch=4, port=29535 if family == "sd3" else 29536)
    # The two processes' gradients are summed in another order than one process's: at this rate, the
    # transformers' weights then differ in the fifth decimal.
    assert_same_run(one, two, "pytorch_lora_weights.safetensors", "transformer.", atol=5e-5)
