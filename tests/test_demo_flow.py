"""The demo world's flow-matching model: a smoke-sized build of it, and configs/demo_flow.yaml on the shipped one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from raft_diffusion.demo import world

ROOT = Path(__file__).resolve().parents[1]


def test_quick_flow_build_is_a_stock_sd3_folder_on_the_tiny_sds_parts(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from scripts.demo.build_flow import FlowBuildConfig, build_flow_assets
    from scripts.demo.build_image import build_image_assets

    build_image_assets(tmp_path, quick=True, log=lambda msg: None)
    cfg = FlowBuildConfig.quick()
    figures = build_flow_assets(tmp_path, tmp_path / "sd", cfg, log=lambda msg: None)
    assert figures["transformer_steps"] == cfg.steps and np.isfinite(figures["transformer_loss"])
    assert [point["step"] for point in figures["curve_48_val"]] == [2, 5]
    for split in ("val", "eval"):
        assert 0 <= figures[f"sd3_{split}_alignment"]["both"] <= 1 and 1 <= figures[f"sd3_{split}_gold"]["mean"] <= 10

    # How SD3 users load a folder without T5.
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "sd3", text_encoder_3=None, tokenizer_3=None)
    assert pipe.tokenizer.model_max_length == cfg.clip_tokens and pipe.vae.config.shift_factor == 0.0
    # The tiny SD's autoencoder and text encoder, unchanged; the projection onto the pooled output is the identity.
    sd_vae = json.loads((tmp_path / "sd" / "vae" / "config.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(sd_vae["scaling_factor"])
    from transformers import CLIPTextModel

    sd_text = CLIPTextModel.from_pretrained(tmp_path / "sd" / "text_encoder")
    ids = pipe.tokenizer(["a red circle on a blue background"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder_2(ids)
        assert torch.allclose(out.text_embeds, sd_text(ids).pooler_output, atol=1e-6)
    image = pipe("a red circle on a blue background", height=world.SIZE, width=world.SIZE, num_inference_steps=2,
                 max_sequence_length=cfg.t5_tokens, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (world.SIZE, world.SIZE)

    # The same script, run again, builds the same weights.
    again = build_flow_assets(tmp_path / "again", tmp_path / "sd", cfg, log=lambda msg: None)
    assert again["transformer_loss"] == figures["transformer_loss"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "sd3" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_build_refuses_to_run_without_the_tiny_sd(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "scripts/build_demo_assets.py", "--quick", "--only", "flow", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "build the image half first" in done.stderr
    assert not (tmp_path / "sd3").exists()


def test_two_stages_of_demo_flow_on_the_shipped_model(tmp_path):
    """configs/demo_flow.yaml, at its settings but fewer samples, on the packaged demo:sd3; the export
    loads into the stock pipeline and changes its pictures."""
    from diffusers import StableDiffusion3Pipeline

    from raft_diffusion.assets import resolve
    from raft_diffusion.cli import main

    overrides = ["run.stages=2", f"run.output_dir={tmp_path}", "sampling.prompts_per_stage=4", "sampling.k=4",
                 "sampling.batch_size=16", "selection.keep=0.25", "train.steps_per_stage=3", "train.batch_size=4",
                 "eval.every=2", "eval.max_prompts=4", "eval.k=2", "log.report=false", "--quiet"]
    assert main(["train", "--config", str(ROOT / "configs" / "demo_flow.yaml"), *overrides]) == 0
    run = tmp_path / "demo_flow"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_demo_gold" in r]
    assert [e["stage"] for e in evals] == [0, 2]
    assert all(np.isfinite(e[k]) for e in evals for k in ("eval_reward", "eval_demo_gold", "eval_demo_gold_align"))
    # The config's two reward parts, the proxy and the prompt-fidelity term, both score every candidate.
    parts = {r["name"] for r in yaml.safe_load((ROOT / "configs" / "demo_flow.yaml").read_text())["rewards"]}
    assert parts == {"aesthetic", "clip_score"}
    assert all(np.isfinite(e[f"eval_reward_{p}"]) and np.isfinite(r[f"reward_{p}_mean"])
               for e in evals for r in rows if "reward_mean" in r for p in parts)
    assert [r["train_steps"] for r in rows if "train_steps" in r] == [3, 3]

    pipe = StableDiffusion3Pipeline.from_pretrained(resolve("demo:sd3"), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)

    def picture():
        return np.asarray(pipe("a red circle on a blue background", height=32, width=32, num_inference_steps=4,
                               max_sequence_length=1, generator=torch.Generator().manual_seed(0), output_type="np").images[0])

    before = picture()
    pipe.load_lora_weights(str(run / "final"))
    assert not np.allclose(before, picture())
    # Whole: every exported layer became a LoRA layer of the transformer, and every kind the config targets is there.
    from safetensors.torch import load_file

    exported = {k.split(".lora_A")[0].removeprefix("transformer.")
                for k in load_file(run / "final" / "pytorch_lora_weights.safetensors") if ".lora_A" in k}
    loaded = {name for name, module in pipe.transformer.named_modules() if hasattr(module, "lora_A") and module.lora_A}
    from raft_diffusion.adapters.diffusion.families.base import MMDIT_LORA_TARGETS

    lora = yaml.safe_load((ROOT / "configs" / "demo_flow.yaml").read_text())["model"]["lora"]
    targets = lora.get("targets") or MMDIT_LORA_TARGETS
    assert exported == loaded and all(any(name.endswith("." + t) for name in loaded) for t in targets)
