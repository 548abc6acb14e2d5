"""`accelerate launch` with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from raft_diffusion.demo.random_sd import build_random_sd

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one(tmp_path):
    sd = build_random_sd(tmp_path / "sd")
    common = [
        f"model.pretrained={sd}", "model.device=cpu", "run.stages=2",
        "sampling.k=2", "sampling.prompts_per_stage=4", "sampling.steps=3", "sampling.guidance_scale=2",
        "train.steps_per_stage=3", "eval.every=1", "eval.k=1", "eval.metrics=[]", "log.report=false",
        "prompts.items=[a red circle, a blue square, a green cross, a white triangle, a purple cross]",
        "prompts.eval_items=[a red square, a blue circle]", "rewards=tests.plugins:brightness", "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "raft_diffusion.cli", "train", *common, f"run.output_dir={tmp_path / 'one'}", "train.batch_size=4"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533"]
    two = subprocess.run(
        [*launcher, str(ROOT / "scripts" / "train.py"), *common, f"run.output_dir={tmp_path / 'two'}", "train.batch_size=2"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]

    a = load_file(str(tmp_path / "one" / "demo" / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "demo" / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora.up" in k)
    assert moved > 1e-3  # training did something, so equality below means something
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)

    lines = {name: [json.loads(l) for l in (tmp_path / name / "demo" / "metrics.jsonl").read_text().splitlines()] for name in ("one", "two")}
    assert [r["stage"] for r in lines["two"]] == [0, 1, 2]  # written once, by the main process
    for r1, r2 in zip(lines["one"], lines["two"]):
        for key in ("reward_mean", "reward_chosen_mean", "eval_reward", "train_loss"):
            if key in r1:
                assert abs(r1[key] - r2[key]) < 1e-4, key
    ckpt = tmp_path / "two" / "demo" / "checkpoints" / "000002"
    assert (ckpt / "rng_state_0.pt").exists() and (ckpt / "rng_state_1.pt").exists()
