"""A run killed with SIGKILL at any moment and resumed ends with exactly the weights and metrics of
an uninterrupted run. Real subprocesses, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scripts.demo.random_sd import build_random_sd
from tests.lm_fixtures import build_tiny_lm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_random_sd(tmp_path_factory.mktemp("tiny_sd"))


def command(tiny_sd, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raft_diffusion.cli", "train",
        f"model.pretrained={tiny_sd}",
        f"run.output_dir={out}",
        "run.name=kill",
        "run.stages=3",
        "sampling.k=2",
        "sampling.prompts_per_stage=2",
        "diffusion.steps=3",
        "diffusion.guidance_scale=2",
        "train.steps_per_stage=3",
        "train.batch_size=2",
        "eval.every=1",
        "eval.k=1",
        "prompts.items=[a red circle, a blue square, a green cross]",
        "prompts.eval_items=[a white triangle]",
        "rewards=[{target: 'tests.plugins:brightness_with_marker'}]",
        "log.report=false",
        "eval.metrics=[]",
        *extra,
    ]


def environment(markers: Path) -> dict:
    markers.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAFT_TEST_MARKERS": str(markers), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def llm_command(lm: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "raft_diffusion.cli", "train",
        "model.kind=llm", f"model.pretrained={lm}", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.dropout=0.1", "model.lora.targets=[]",
        f"run.output_dir={out}", "run.name=kill", "run.stages=3", "run.save_images=false",
        "sampling.k=4", "sampling.prompts_per_stage=3", "llm.max_new_tokens=6",
        "train.steps_per_stage=3", "train.batch_size=2", "train.grad_accum=2", "train.lr=0.01",
        "eval.every=1", "eval.k=2", "eval.metrics=[]", "log.report=false",
        "prompts.items=[the movie was, a pizza is, the phone was]", "prompts.eval_items=[a movie is]",
        "rewards=[{target: 'tests.plugins:good_count_with_marker'}]",
        *extra,
    ]


WEIGHTS = {"diffusion": "pytorch_lora_weights.safetensors", "llm": "adapter_model.safetensors"}


def final_state(run: Path, kind: str = "diffusion") -> tuple[dict, list[dict]]:
    weights = load_file(str(run / "final" / WEIGHTS[kind]))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Wall-clock figures differ between any two runs; everything else must be equal.
    return weights, [{k: v for k, v in m.items() if not k.startswith("time_") and "seconds" not in k} for m in metrics]


def run_until(cmd, env, kill_when) -> int:
    """Start the run, SIGKILL it as soon as ``kill_when()`` is true; return its exit code."""
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if kill_when():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    subprocess.run(command(tiny_sd, out), env=environment(out / "markers"), cwd=ROOT, check=True, capture_output=True)
    return final_state(out / "kill"), time.monotonic() - start


def _kill_points():
    # (name, a predicate factory (run folder, markers, start time, reference duration) -> kill now?)
    return {
        "while-scoring-stage-2": lambda run, markers, t0, dur: (markers / "score-003").exists(),
        "while-writing-checkpoint-2": lambda run, markers, t0, dur: (run / "checkpoints" / ".tmp-000002").exists(),
        "after-checkpoint-before-metrics": lambda run, markers, t0, dur: (run / "checkpoints" / "000002").exists(),
        # Past half of the reference run's time; at the latest at the 6th of its 7 reward calls, where a
        # run that happens to go faster than the reference (a busier machine then) would otherwise finish.
        "at-55-percent": lambda run, markers, t0, dur: time.monotonic() - t0 > 0.55 * dur or (markers / "score-005").exists(),
        "while-exporting-final": lambda run, markers, t0, dur: (run / ".tmp-final").exists(),
    }


@pytest.mark.parametrize("point", list(_kill_points()))
def test_kill_and_resume_equals_uninterrupted(point, tiny_sd, tmp_path, reference):
    (ref_weights, ref_metrics), duration = reference
    run = tmp_path / "kill"
    markers = tmp_path / "markers"
    env = environment(markers)
    predicate = _kill_points()[point]
    t0 = time.monotonic()
    code = run_until(command(tiny_sd, tmp_path), env, lambda: predicate(run, markers, t0, duration))
    assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill point {point!r}"
    # Resume as often as it takes (once here), then compare.
    done = subprocess.run(command(tiny_sd, tmp_path, "--resume"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    weights, metrics = final_state(run)
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert (weights[key] == ref_weights[key]).all(), key
    assert metrics == ref_metrics
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())


def test_sigterm_leaves_a_resumable_run(tiny_sd, tmp_path):
    run = tmp_path / "kill"
    markers = tmp_path / "markers"
    env = environment(markers)
    proc = subprocess.Popen(command(tiny_sd, tmp_path), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (markers / "score-002").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "--resume" in err and "Traceback" not in err
    done = subprocess.run(command(tiny_sd, tmp_path, "--resume"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run / "final").is_dir()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.mark.parametrize("point", ["while-scoring-stage-2", "after-checkpoint-before-metrics"])
def test_llm_kill_and_resume_equals_uninterrupted(point, tiny_lm, tmp_path):
    # LoRA dropout draws from the global RNG, and accumulation spans micro-batches: both must resume exactly.
    reference = tmp_path / "reference"
    subprocess.run(llm_command(tiny_lm, reference), env=environment(reference / "markers"), cwd=ROOT, check=True, capture_output=True)
    ref_weights, ref_metrics = final_state(reference / "kill", "llm")

    run = tmp_path / "kill"
    markers = tmp_path / "markers"
    env = environment(markers)
    predicate = _kill_points()[point]
    code = run_until(llm_command(tiny_lm, tmp_path), env, lambda: predicate(run, markers, 0, 0))
    assert code == -signal.SIGKILL, f"the run ended ({code}) before the kill point {point!r}"
    done = subprocess.run(llm_command(tiny_lm, tmp_path, "--resume"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    weights, metrics = final_state(run, "llm")
    assert weights.keys() == ref_weights.keys()
    assert all((weights[key] == ref_weights[key]).all() for key in weights)
    assert metrics == ref_metrics and all("train_loss" in m for m in metrics if m["stage"] > 0)


def test_flux_kill_and_resume_equals_uninterrupted(tmp_path):
    """A flow-matching family through the same run folder: killed while scoring stage 2, resumed, equal."""
    from scripts.demo.random_flow import build_flux

    flux = build_flux(tmp_path / "flux")
    (tmp_path / "flow.yaml").write_text("model:\n  kind: diffusion\n")  # the defaults, not the demo's recipe

    def flux_command(out: Path, *extra: str) -> list[str]:
        cmd = command(flux, out, "diffusion.height=16", "diffusion.width=16", "diffusion.max_sequence_length=16",
                      "diffusion.guidance_scale=3.5", "train.lr=2e-3", *extra)
        return [*cmd[:4], "--config", str(tmp_path / "flow.yaml"), *cmd[4:]]

    subprocess.run(flux_command(tmp_path / "ref"), env=environment(tmp_path / "ref_markers"), cwd=ROOT, check=True, capture_output=True)
    ref_weights, ref_metrics = final_state(tmp_path / "ref" / "kill")
    markers = tmp_path / "markers"
    env = environment(markers)
    code = run_until(flux_command(tmp_path), env, lambda: (markers / "score-003").exists())
    assert code == -signal.SIGKILL
    done = subprocess.run(flux_command(tmp_path, "--resume"), env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    weights, metrics = final_state(tmp_path / "kill")
    assert weights.keys() == ref_weights.keys() and any(k.startswith("transformer.") for k in weights)
    assert all((weights[k] == ref_weights[k]).all() for k in weights)
    assert metrics == ref_metrics
