"""Every kind of bad input ends with one line on stderr and exit code 2: no traceback, and nothing
written outside the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raft_diffusion.cli import main
from scripts.demo.random_sd import build_random_sd


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_random_sd(tmp_path_factory.mktemp("tiny_sd"))


def small_run(tiny_sd, out) -> list[str]:
    return [
        f"model.pretrained={tiny_sd}",
        f"run.output_dir={out}",
        "run.name=bad",
        "run.stages=1",
        "sampling.k=2",
        "sampling.prompts_per_stage=2",
        "diffusion.steps=2",
        "diffusion.guidance_scale=1",
        "train.steps_per_stage=1",
        "train.batch_size=1",
        "eval.every=0",
        "prompts.items=[a red circle]",
        "rewards=[{target: 'tests.plugins:brightness'}]",
        "log.report=false",
        "eval.metrics=[]",
    ]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _other_lora(tmp_path: Path) -> Path:
    """A LoRA folder in diffusers format whose shapes belong to another model."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "foreign_lora"
    folder.mkdir()
    save_file(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4),
        },
        str(folder / "pytorch_lora_weights.safetensors"),
    )
    return folder


LATIN1 = "café".encode("latin-1")

# (id, extra overrides (or a callable building them from tmp_path), words the one-line message must contain)
CASES = [
    ("unknown-key", ["run.nonsense=1"], "nonsense"),
    ("typo-key", ["sampling.kk=3"], "did you mean 'k'"),
    ("wrong-type", ["sampling.k=three"], "sampling.k"),
    ("impossible-k", ["sampling.k=0"], "sampling.k"),
    ("impossible-keep", ["selection.keep=1.5"], "selection.keep"),
    ("impossible-stages", ["run.stages=0"], "run.stages"),
    ("missing-prompt-file", lambda t: ["prompts.items=[]", f"prompts.file={t / 'nope.txt'}"], "not found"),
    ("empty-prompt-file", lambda t: ["prompts.items=[]", f"prompts.file={_write(t / 'e.txt', b'# none')}"], "no prompts"),
    ("non-utf8-prompt-file", lambda t: ["prompts.items=[]", "prompts.file=" + str(_write(t / "l.txt", LATIN1))], "UTF-8"),
    ("model-not-a-pipeline", lambda t: [f"model.pretrained={(t / 'empty').mkdir() or t / 'empty'}"], "empty"),
    ("model-missing", ["model.pretrained=/nonexistent/sd-folder"], "/nonexistent/sd-folder"),
    ("lora-from-another-model", lambda t: [f"model.init_lora={_other_lora(t)}"], "foreign_lora"),
    ("lora-targets-not-in-the-model", ["model.lora.targets=[to_q,c_attn]"], "model.lora.targets: c_attn match no module"),
    ("unknown-reward", ["rewards=[{name: aesthetik}]"], "aesthetik"),
    ("reward-not-importable", ["rewards=[{target: 'no_such_module:score'}]"], "no_such_module"),
    ("reward-not-callable", ["rewards=[{target: 'tests.plugins:not_callable'}]"], "not callable"),
    ("reward-wrong-count", ["rewards=[{target: 'tests.plugins:wrong_count'}]"], "scores for"),
    ("reward-strings", ["rewards=[{target: 'tests.plugins:strings'}]"], "non-numeric"),
    ("reward-all-nan", ["rewards=[{target: 'tests.plugins:all_nan'}]"], "no finite score"),
    ("reward-raises", ["rewards=[{target: 'tests.plugins:raises'}]"], "scoring service is down"),
    ("unwritable-output", lambda t: [f"run.output_dir={_write(t / 'a_file', b'x')}/runs"], "not a folder"),
    ("uncreatable-output", lambda t: ["run.output_dir=/proc/raft-runs"] if Path("/proc/self").is_dir()
     else pytest.skip("needs Linux /proc"), "cannot create run folder /proc/raft-runs/bad: /proc/raft-runs"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tiny_sd, tmp_path, capsys, monkeypatch):
    _, extra, words = case
    monkeypatch.chdir(tmp_path)
    extra = extra(tmp_path) if callable(extra) else extra
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    code = main(["train", *small_run(tiny_sd, out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert words in err
    created = set(tmp_path.iterdir()) - before
    assert created <= {out}  # nothing written outside the run folder's parent


def test_finished_run_needs_resume_or_overwrite(tiny_sd, tmp_path, capsys):
    args = small_run(tiny_sd, tmp_path / "out")
    assert main(["train", *args]) == 0
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert "finished run" in err and "--resume" in err and "\n" not in err
    assert main(["train", *args, "--resume"]) == 0  # a finished run resumes to nothing new


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_invalid_yaml(tmp_path, capsys):
    bad = _write(tmp_path / "bad.yaml", b"run: [unclosed\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid YAML" in err and "\n" not in err


def test_unreadable_images_for_score(tmp_path, capsys):
    _write(tmp_path / "broken.png", b"not a png")
    code = main(["score", str(tmp_path / "broken.png"), "--reward", "brightness"])
    assert code == 2
    assert "broken.png" in capsys.readouterr().err


def test_console_command_in_a_fresh_process(tmp_path):
    """The real entry point, as a user runs it: one line, exit 2, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "raft_diffusion.cli", "train", "run.nonsense=1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "nonsense" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra, key",
    [
        (["rewards=[{name: aesthetic, args: {clip: ViT-L-14, pretrained: openai}}]"], "rewards.0"),
        (["eval.every=1", "prompts.eval_items=[a blue square]", "eval.metrics=[{name: clip_score}]"], "eval.metrics.0"),
    ],
    ids=["reward", "eval-metric"],
)
def test_reward_weights_not_on_disk_fail_before_the_model_loads(extra, key, tiny_sd, tmp_path, capsys, monkeypatch):
    """A reward or eval metric whose weights are missing ends the run before the pipeline loads (let alone
    samples), naming the overrides that point it at local files."""
    from huggingface_hub import constants

    import raft_diffusion.adapters as adapters

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # no developer's cached CLIP
    monkeypatch.setattr(adapters, "build_adapter", lambda *a, **k: pytest.fail("the model loaded before the reward"))
    out = tmp_path / "out"
    assert main(["train", *small_run(tiny_sd, out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {key} (") and "\n" not in err and "ViT-L-14/openai" in err
    assert f"{key}.args.clip=ViT-L-14-quickgelu {key}.args.pretrained=/path/to/open_clip_pytorch_model.bin" in err
    assert not (out / "bad").exists()


def test_full_disk_mid_run_is_one_line_and_the_run_resumes(tiny_sd, tmp_path, capsys, monkeypatch):
    import errno

    from raft_diffusion.core.run_dir import RunDir

    def disk_full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    args = [*small_run(tiny_sd, tmp_path / "out"), "run.stages=2"]
    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "append_metrics", disk_full)
        assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write run folder") and "No space left on device" in err and "\n" not in err
    assert "--resume" in err
    run = RunDir(tmp_path / "out" / "bad")
    assert run.completed_stages() == [1]  # the stage whose metrics line failed was checkpointed: nothing lost
    assert main(["train", *args, "--resume"]) == 0
    assert [r["stage"] for r in run.read_metrics()] == [1, 2] and run.is_finished()


def test_report_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from raft_diffusion import report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"stage": 1, "reward_mean": 1.0}\n')

    def read_only(run_dir):
        raise PermissionError(errno.EACCES, "Permission denied", str(run_dir.report))

    monkeypatch.setattr(report, "write_report", read_only)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write the report in {run}: {run / 'report.html'}: Permission denied"
