"""DiffusionAdapter on a tiny random Stable Diffusion XL pipeline (build_random_sd preset "tiny_xl"), on the CPU:
the same sampler, trainer, checkpoints and export as SD, with SDXL's two text encoders, pooled
embedding and size ids."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scripts.demo.random_sd import build_random_sd
from tests.sd_fixtures import load_lora_collecting_messages
from tests.test_diffusion_adapter import latents, make_adapter, make_config, one_line, pixels

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny ops: two threads fighting other processes for two cores are many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_xl(tmp_path_factory):
    return str(build_random_sd(tmp_path_factory.mktemp("tiny_xl"), preset="tiny_xl"))


def stock_pipeline(path, scheduler_cls=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


# ---------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("scheduler, eta", [("euler", 0.0), ("ddim", 1.0)])
def test_generate_groups_regenerates_alone_and_matches_the_stock_sdxl_pipeline(tiny_xl, scheduler, eta):
    adapter = make_adapter(tiny_xl, diffusion={"scheduler": scheduler, "eta": eta})
    assert type(adapter.pipe).__name__ == "StableDiffusionXLPipeline"
    prompts, seeds = ["a red cat", "a blue dog"], [10, 11, 12, 13, 14, 15]
    cands = adapter.generate(prompts, 3, seeds)  # batches of 4 straddle the two prompts

    assert [(c.prompt, c.prompt_index, c.k_index, c.seed) for c in cands] == [
        (prompts[i // 3], i // 3, i % 3, seeds[i]) for i in range(6)
    ]
    payload = cands[0].payload
    assert {k: tuple(v.shape) for k, v in payload.items()} == {
        "latents": (4, 8, 8), "prompt_embeds": (77, 64), "pooled_prompt_embeds": (32,), "add_time_ids": (6,)}
    assert all(t.device.type == "cpu" for c in cands for t in c.payload.values())
    assert payload["add_time_ids"].tolist() == [16, 16, 0, 0, 16, 16]  # original size, crop, target size
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        assert torch.equal(cands[0].payload[key], cands[2].payload[key])
        assert not torch.equal(cands[0].payload[key], cands[3].payload[key])
    assert (latents(cands[:1]) - latents(cands[1:2])).abs().max() > 0.1  # other seed, other sample

    alone = adapter.generate(["a blue dog"], 1, [14])  # candidate 4, alone in its batch
    torch.testing.assert_close(alone[0].payload["latents"], cands[4].payload["latents"], atol=1e-5, rtol=1e-5)
    assert np.abs(pixels(alone) - pixels(cands[4:5])).max() <= 1

    # A fresh LoRA is zero: the stock pipeline (no negative prompt: zeros, force_zeros_for_empty_prompt) agrees.
    pipe = stock_pipeline(tiny_xl, type(adapter.scheduler))
    stock = pipe(prompts, num_images_per_prompt=3, num_inference_steps=4, guidance_scale=2.0, eta=eta,
                 generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent").images
    torch.testing.assert_close(latents(cands), stock, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuning, KL-shaped ranking


def test_finetune_lowers_the_loss_on_the_chosen_latents_with_pooled_and_size_conditioning(tiny_xl):
    adapter = make_adapter(tiny_xl, train={"steps_per_stage": 20}, diffusion={"caption_dropout": 0.2})
    chosen = adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    cond = {k: torch.stack([c.payload[k] for c in chosen]) for k in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids")}
    # The expected loss over 8 fixed noise draws and timesteps per chosen sample.
    lat = latents(chosen).repeat(8, 1, 1, 1)
    cond = {k: v.repeat(8, *[1] * (v.dim() - 1)) for k, v in cond.items()}
    g = torch.Generator().manual_seed(123)
    noise, timesteps = torch.randn(lat.shape, generator=g), torch.randint(0, 1000, (len(lat),), generator=g)
    with torch.no_grad():
        before = adapter.denoising_loss(lat, cond, noise, timesteps).item()
        # Caption dropout trains on SDXL's unconditional input: zero embeddings, the same size ids.
        dropped = adapter._conditioning(cond, drop=torch.arange(32) % 3 == 0)
    assert dropped["prompt_embeds"][::3].abs().max() == 0 and dropped["pooled_prompt_embeds"][::3].abs().max() == 0
    assert torch.equal(dropped["prompt_embeds"][1], cond["prompt_embeds"][1])
    assert torch.equal(dropped["add_time_ids"], cond["add_time_ids"])

    stats = adapter.finetune(chosen)
    with torch.no_grad():
        after = adapter.denoising_loss(lat, cond, noise, timesteps).item()
    assert after < 0.95 * before, (before, after)
    assert stats["samples"] == 20 * 2 and np.isfinite(stats["loss"])
    with pytest.raises(ValueError, match="pass a dict"):
        adapter.denoising_loss(lat[:4], cond["prompt_embeds"][:4], noise[:4], timesteps[:4])


def test_log_ratio_is_zero_before_training_and_not_after(tiny_xl):
    adapter = make_adapter(tiny_xl, diffusion={"eta": 1.0}, selection={"beta": 0.1}, train={"steps_per_stage": 8})
    cands = adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    assert cands[0].payload["trajectory"].shape == (5, 4, 8, 8)
    assert adapter.log_ratio(cands).abs().max() < 1e-3
    adapter.finetune(cands)
    ratio = adapter.log_ratio(adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3]))
    assert ratio.abs().min() > 1e-3 and ratio.mean() > 0


def test_save_load_resumes_bit_for_bit_with_both_text_encoders(tiny_xl, tmp_path):
    # Text-encoder LoRAs (ids re-encoded), caption dropout to zeros, LoRA dropout, min-SNR, accumulation.
    sections = dict(model={"lora": {"dropout": 0.1}}, train={"grad_accum": 2, "steps_per_stage": 3},
                    diffusion={"text_encoder_lora": True, "caption_dropout": 0.5, "ddpm": {"snr_gamma": 5.0}})
    torch.manual_seed(0)
    straight = make_adapter(tiny_xl, **sections)
    chosen = straight.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    straight.finetune(chosen)
    straight.finetune(chosen)

    torch.manual_seed(0)
    first = make_adapter(tiny_xl, **sections)
    first.finetune(chosen)
    first.save(tmp_path / "ckpt")

    torch.manual_seed(99)  # the restored RNG, not this, must drive the second stage
    resumed = make_adapter(tiny_xl, **sections)
    resumed.load(tmp_path / "ckpt")
    resumed.finetune(chosen)

    expected, got = straight.lora_state_dict(), resumed.lora_state_dict()
    assert {k.split(".")[0] for k in expected} == {"unet", "text_encoder", "text_encoder_2"}
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(expected[k], first.lora_state_dict()[k]) for k in expected)  # stage 2 did train


# ---------------------------------------------------------------------------------------------
# Export, the sample command


def test_export_loads_in_the_stock_sdxl_pipeline_with_the_same_images(tiny_xl, tmp_path):
    from safetensors import safe_open

    from raft_diffusion import sampling

    # alpha != rank: the scale must travel with the file; LoRAs on both text encoders too.
    adapter = make_adapter(tiny_xl, model={"lora": {"rank": 4, "alpha": 2.0}}, diffusion={"text_encoder_lora": True})
    prompts, seeds = ["a cat", "a dog"], [5, 6, 7, 8]
    chosen = adapter.generate(prompts, 2, seeds)
    assert chosen[0].payload["input_ids"].shape == chosen[0].payload["input_ids_2"].shape == (77,)
    with torch.no_grad():  # training re-encodes the ids into what sampling encoded
        recomputed = adapter._conditioning(adapter._stack(chosen[::2]))
    for key, value in adapter._encode(prompts).items():
        torch.testing.assert_close(recomputed[key], value, atol=1e-6, rtol=1e-6)
    adapter.finetune(chosen)
    ours = adapter.generate(prompts, 2, seeds)
    adapter.export(tmp_path / "lora")

    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # Encoder 1 is read at its penultimate layer (of 2): no LoRA on its last one.
    assert not [k for k in keys if k.startswith("text_encoder.") and "layers.1." in k]

    pipe = stock_pipeline(tiny_xl, type(adapter.scheduler))

    def stock(output_type):
        return pipe(prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0, output_type=output_type,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    base = stock("latent")
    messages = load_lora_collecting_messages(pipe, tmp_path / "lora")
    assert not [m for m in messages if "unexpected" in m.lower()]

    assert (base - latents(ours)).abs().max() > 1e-3  # the LoRA changes the samples ...
    torch.testing.assert_close(stock("latent"), latents(ours), atol=1e-5, rtol=1e-5)  # ... and the stock pipeline agrees
    assert np.abs(np.round(stock("np") * 255).astype(np.int16) - pixels(ours)).max() <= 1

    # `raft-diffusion sample --lora` with the run's sampler on the SDXL folder draws the same images, and an
    # SDXL run starts from it.
    args = sampling.build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", tiny_xl, "--lora", str(tmp_path / "lora"), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
         "--seed", "5", "--steps", "4", "--guidance-scale", "2.0", "--batch-size", "4", "--scheduler", "ddim",
         "--device", "cpu", "--out", str(tmp_path / "out")]
    )
    assert sampling.run(args) == 0
    from PIL import Image

    files = sorted((tmp_path / "out").glob("0*.png"))
    written = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])
    assert np.array_equal(written, pixels(ours))


# ---------------------------------------------------------------------------------------------
# Loading: the VAE, the pipeline class


def test_fp16_vae_is_upcast_unless_a_separate_fp16_safe_vae_is_given(tiny_xl, tmp_path):
    from diffusers import AutoencoderKL

    from raft_diffusion.adapters.diffusion import load_pipeline

    config = make_config(tiny_xl)
    pipe, _ = load_pipeline(config.model, config.adapter, torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32  # force_upcast, as diffusers' SDXL does

    # diffusion.vae: a VAE folder that is safe in float16 (force_upcast false, like madebyollin/sdxl-vae-fp16-fix).
    AutoencoderKL.from_pretrained(tiny_xl, subfolder="vae", force_upcast=False).save_pretrained(tmp_path / "vae_fix")
    config = make_config(tiny_xl, diffusion={"vae": str(tmp_path / "vae_fix")})
    pipe, _ = load_pipeline(config.model, config.adapter, torch.float16)
    assert pipe.vae.dtype == torch.float16 and not pipe.vae.config.force_upcast


def test_unsupported_pipeline_class_and_settings_are_one_clear_line(tiny_xl, tmp_path):
    from raft_diffusion.adapters.diffusion import DiffusionAdapter, UnsupportedModelError
    from tests.test_diffusion_adapter import _accelerator

    index = json.loads(Path(tiny_xl, "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    (tmp_path / "refiner").mkdir()
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedModelError) as err:
        DiffusionAdapter(make_config(str(tmp_path / "refiner")), _accelerator())
    assert "StableDiffusionXLImg2ImgPipeline" in str(err.value) and one_line(err)
    with pytest.raises(UnsupportedModelError) as err:
        DiffusionAdapter(make_config(tiny_xl, diffusion={"safety_checker": True}), _accelerator())
    assert "diffusion.safety_checker" in str(err.value) and one_line(err)


def test_sdxl_config_is_valid():
    from raft_diffusion.core.config import load_config

    c = load_config("configs/sdxl_aesthetic_1024.yaml")
    assert (c.model.pretrained, c.model.dtype, c.adapter.vae, c.adapter.height, c.adapter.width) == (
        "stabilityai/stable-diffusion-xl-base-1.0", "bfloat16", None, 1024, 1024)
    assert (c.train.mixed_precision, c.rewards[0]["name"], c.rewards[0]["args"]) == (
        "bf16", "aesthetic", {"clip": "ViT-L-14", "pretrained": "openai"})
