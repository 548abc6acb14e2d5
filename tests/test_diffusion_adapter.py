"""DiffusionAdapter on a tiny random Stable Diffusion pipeline (tests/sd_fixtures.py), on the CPU."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from raft_diffusion.core.protocols import Adapter, has_log_ratio
from raft_diffusion.core.config import from_dict, load_config
from tests.sd_fixtures import build_tiny_sd, load_lora_collecting_messages

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors

BASE = {
    "run": {"seed": 0},
    "sampling": {"batch_size": 4},
    "diffusion": {"steps": 4, "guidance_scale": 2.0},
    "train": {"steps_per_stage": 4, "batch_size": 2, "lr": 1e-2},
}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return str(build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_v"), prediction_type="v_prediction"))


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def make_config(model_path: str, **sections):
    return from_dict(_merge(_merge(BASE, {"model": {"pretrained": model_path}}), sections))


def make_adapter(model_path: str, **sections):
    from accelerate import Accelerator

    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    config = make_config(model_path, **sections)
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision,
                              gradient_accumulation_steps=config.train.grad_accum, cpu=True)
    return DiffusionAdapter(config, accelerator)


def pixels(candidates) -> np.ndarray:
    return np.stack([np.asarray(c.output, dtype=np.int16) for c in candidates])


def latents(candidates) -> torch.Tensor:
    return torch.stack([c.payload["latents"] for c in candidates])


def one_line(err) -> bool:
    return "\n" not in str(err.value) and len(str(err.value)) < 400


# ---------------------------------------------------------------------------------------------
# Sampling


def test_generate_groups_by_prompt_and_each_candidate_regenerates_from_its_seed(tiny_sd):
    adapter = make_adapter(tiny_sd)
    assert isinstance(adapter, Adapter)
    prompts, seeds = ["a red cat", "a blue dog"], [10, 11, 12, 13, 14, 15]
    cands = adapter.generate(prompts, 3, seeds)  # batches of 4 straddle the two prompts

    assert [(c.prompt, c.prompt_index, c.k_index, c.seed) for c in cands] == [
        (prompts[i // 3], i // 3, i % 3, seeds[i]) for i in range(6)
    ]
    c = cands[0]
    assert c.output.mode == "RGB" and c.output.size == (16, 16)
    assert c.payload["latents"].shape == (4, 8, 8) and c.payload["latents"].dtype == torch.float32
    assert c.payload["prompt_embeds"].shape == (77, 32)
    assert all(t.device.type == "cpu" for t in c.payload.values())
    assert torch.equal(cands[0].payload["prompt_embeds"], cands[2].payload["prompt_embeds"])
    assert not torch.equal(cands[0].payload["prompt_embeds"], cands[3].payload["prompt_embeds"])
    assert (latents(cands[:1]) - latents(cands[1:2])).abs().max() > 0.1  # other seed, other sample

    again = adapter.generate(prompts, 3, seeds)
    assert torch.equal(latents(again), latents(cands)) and np.array_equal(pixels(again), pixels(cands))

    alone = adapter.generate(["a blue dog"], 1, [14])  # candidate 4, alone in its batch
    torch.testing.assert_close(alone[0].payload["latents"], cands[4].payload["latents"], atol=1e-5, rtol=1e-5)
    assert np.abs(pixels(alone) - pixels(cands[4:5])).max() <= 1

    with pytest.raises(ValueError, match="seeds"):
        adapter.generate(prompts, 3, seeds[:5])


@pytest.mark.parametrize("scheduler, eta", [("euler_a", 0.0), ("ddim", 1.0), ("dpm++", 0.0)])
def test_samplers_match_the_stock_pipeline_and_regenerate_alone(tiny_sd, scheduler, eta):
    from diffusers import StableDiffusionPipeline

    adapter = make_adapter(tiny_sd, diffusion={"scheduler": scheduler, "eta": eta, "steps": 3})
    cls = type(adapter.scheduler)
    assert cls.__name__ == {"euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
                            "dpm++": "DPMSolverMultistepScheduler"}[scheduler]
    cands = adapter.generate(["a cat", "a dog"], 2, [1, 2, 3, 4])

    # A fresh LoRA is zero: the stock pipeline with the same sampler and seeds draws the same latents.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    stock = pipe(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0, eta=eta,
                 generator=[torch.Generator().manual_seed(s) for s in [1, 2, 3, 4]], output_type="latent").images
    torch.testing.assert_close(latents(cands), stock, atol=1e-5, rtol=1e-5)

    alone = adapter.generate(["a dog"], 1, [4])
    torch.testing.assert_close(alone[0].payload["latents"], cands[3].payload["latents"], atol=1e-5, rtol=1e-5)


def test_guidance_rescale_matches_the_stock_pipeline(tiny_sd):
    from diffusers import StableDiffusionPipeline

    adapter = make_adapter(tiny_sd, diffusion={"steps": 3, "guidance_rescale": 0.7})
    cands = adapter.generate(["a cat", "a dog"], 2, [1, 2, 3, 4])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(adapter.scheduler).from_config(pipe.scheduler.config)
    generators = lambda: [torch.Generator().manual_seed(s) for s in [1, 2, 3, 4]]  # noqa: E731
    run = lambda rescale: pipe(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=3, guidance_scale=2.0,  # noqa: E731
                               guidance_rescale=rescale, generator=generators(), output_type="latent").images
    stock = run(0.7)
    torch.testing.assert_close(latents(cands), stock, atol=1e-5, rtol=1e-5)
    assert (stock - run(0.0)).abs().max() > 1e-3  # the rescale changes what is drawn


def test_unknown_scheduler_is_refused_in_one_line(tiny_sd):
    with pytest.raises(ValueError) as err:
        make_adapter(tiny_sd, diffusion={"scheduler": "fancy"})
    assert "diffusion.scheduler" in str(err.value) and one_line(err)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def test_finetune_lowers_the_denoising_loss_on_the_chosen_latents(tiny_sd):
    adapter = make_adapter(tiny_sd, train={"steps_per_stage": 20})
    chosen = adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    lat = latents(chosen)
    embeds = torch.stack([c.payload["prompt_embeds"] for c in chosen])
    g = torch.Generator().manual_seed(123)
    noise, timesteps = torch.randn(lat.shape, generator=g), torch.tensor([50, 300, 600, 900])
    with torch.no_grad():
        before = adapter.denoising_loss(lat, embeds, noise, timesteps).item()
    stats = adapter.finetune(chosen)
    with torch.no_grad():
        after = adapter.denoising_loss(lat, embeds, noise, timesteps).item()
    assert after < 0.95 * before
    assert stats["samples"] == 20 * 2 and stats["steps"] == 20
    assert np.isfinite([stats[k] for k in ("loss", "loss_first", "loss_last", "grad_norm", "seconds")]).all()


def test_raft_on_brightness_makes_fresh_samples_brighter(tiny_sd_v):
    """Hand-made RAFT: K samples per prompt, keep the brightest, fine-tune on it; three stages."""
    adapter = make_adapter(tiny_sd_v, sampling={"batch_size": 16}, diffusion={"steps": 8, "guidance_scale": 1.0},
                           train={"steps_per_stage": 20, "batch_size": 4, "lr": 2e-2})
    prompts, k = ["a photo", "a cat"], 8
    eval_seeds = list(range(1000, 1032))

    def brightness(cands):
        return torch.tensor(pixels(cands).mean(axis=(1, 2, 3)), dtype=torch.float32)

    before = brightness(adapter.generate(prompts, 16, eval_seeds))
    for stage in range(3):
        cands = adapter.generate(prompts, k, list(range(stage * 16, stage * 16 + 16)))
        reward = brightness(cands).view(len(prompts), k)
        adapter.finetune([cands[p * k + int(reward[p].argmax())] for p in range(len(prompts))])
    after = brightness(adapter.generate(prompts, 16, eval_seeds))
    # The same 32 seeds before and after: a gain of 1.5 is about five standard errors.
    assert after.mean() > before.mean() + 1.5, (before.mean(), after.mean())


def test_guided_loss_is_the_loss_of_the_guided_prediction(tiny_sd):
    scale = 7.5
    adapter = make_adapter(tiny_sd, diffusion={"guidance_scale": scale, "guided_loss": True}, train={"steps_per_stage": 20})
    chosen = adapter.generate(["a cat", "a dog"], 1, [0, 1])
    lat = latents(chosen)
    embeds = torch.stack([c.payload["prompt_embeds"] for c in chosen])
    g = torch.Generator().manual_seed(5)
    noise, timesteps = torch.randn(lat.shape, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        guided = adapter.denoising_loss(lat, embeds, noise, timesteps).item()
        noisy = adapter.objective.scheduler.add_noise(lat, noise, timesteps)
        uncond = adapter._as_unconditional(adapter._encode([""]), "")["prompt_embeds"].expand_as(embeds)
        eps_c = adapter.denoiser(noisy, timesteps, encoder_hidden_states=embeds).sample
        eps_u = adapter.denoiser(noisy, timesteps, encoder_hidden_states=uncond).sample
        target = adapter.objective.scheduler.get_velocity(lat, noise, timesteps) if adapter.objective.scheduler.config.prediction_type == "v_prediction" else noise
        expected = torch.nn.functional.mse_loss(eps_u + scale * (eps_c - eps_u), target).item()
        plain = torch.nn.functional.mse_loss(eps_c, target).item()
    # A random tiny UNet barely tells cond from uncond: the two losses differ by well under 1 %, so
    # "different" is measured against the tolerance of "equal", not against a share of the loss.
    assert guided == pytest.approx(expected, rel=1e-5)
    assert abs(plain - expected) > 20 * 1e-5 * expected
    adapter.finetune(chosen)
    with torch.no_grad():
        assert adapter.denoising_loss(lat, embeds, noise, timesteps).item() < 0.95 * guided  # it trains that loss


def test_fused_sampling_draws_the_same_images_and_leaves_the_weights_alone(tiny_sd):
    conv_lora = {"lora": {"targets": ["to_q", "to_v", "conv1", "conv2"]}}
    adapter = make_adapter(tiny_sd, model=conv_lora, diffusion={"text_encoder_lora": True})
    prompts, seeds = ["a cat", "a dog"], [5, 6, 7, 8]
    adapter.finetune(adapter.generate(prompts, 2, seeds))
    weights = {n: p.detach().clone() for m in adapter.train_modules for n, p in m.named_parameters()}
    fused = adapter.generate(prompts, 2, seeds)
    adapter.settings.fuse_lora = False
    plain = adapter.generate(prompts, 2, seeds)
    assert (latents(fused) - latents(plain)).abs().max() > 0  # folded: another order of the same sums ...
    torch.testing.assert_close(latents(fused), latents(plain), atol=1e-4, rtol=1e-4)  # ... the same images
    after = {n: p for m in adapter.train_modules for n, p in m.named_parameters()}
    assert after.keys() == weights.keys() and all(torch.equal(after[n], weights[n]) for n in weights)
    adapter.settings.fuse_lora = True
    assert torch.equal(latents(adapter.generate(prompts, 2, seeds)), latents(fused))  # the LoRA layers are back on


def test_half_precision_weights_sample_unfused(tiny_sd):
    adapter = make_adapter(tiny_sd, model={"dtype": "bfloat16", "lora": {"targets": ["to_q", "conv1"]}})
    prompts, seeds = ["a cat"], [5, 6]
    adapter.finetune(adapter.generate(prompts, 2, seeds))
    fused = adapter.generate(prompts, 2, seeds)
    adapter.settings.fuse_lora = False
    assert torch.equal(latents(adapter.generate(prompts, 2, seeds)), latents(fused))  # the LoRA layers ran both times


def test_timestep_bias_draws_the_noise_levels_it_names(tiny_sd):
    def drawn(**ddpm):
        adapter = make_adapter(tiny_sd, diffusion={"ddpm": ddpm})
        n = adapter.objective.scheduler.config.num_train_timesteps
        lat, cond = torch.zeros(8, 4, 4, 4), {"prompt_embeds": torch.zeros(8, 1, 1)}
        t = torch.cat([adapter._draw_batch(lat, cond, torch.arange(8))[3] for _ in range(500)])
        return t, n

    t, n = drawn()
    assert 0.2 < (t >= n * 3 // 4).float().mean() < 0.3  # uniform: a quarter in the noisiest quarter
    t, n = drawn(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    assert 0.45 < (t >= n * 3 // 4).float().mean() < 0.55  # 3 x 1/4 against 3/4
    t, n = drawn(timestep_bias_strategy="earlier", timestep_bias_multiplier=0.0, timestep_bias_portion=0.5)
    assert t.min() >= n // 2 and t.max() == n - 1  # the cleaner half is never drawn
    t, n = drawn(timestep_bias_strategy="range", timestep_bias_multiplier=0.0, timestep_bias_begin=0, timestep_bias_end=n - 10)
    assert t.min() >= n - 10


def test_save_load_resumes_bit_for_bit(tiny_sd, tmp_path):
    # Every random consumer on: caption dropout, LoRA dropout (global RNG), min-SNR, accumulation,
    # biased timesteps; and the moving average.
    sections = dict(model={"lora": {"dropout": 0.1}}, train={"grad_accum": 2, "steps_per_stage": 3, "ema_decay": 0.9},
                    diffusion={"caption_dropout": 0.5, "ddpm": {"snr_gamma": 5.0, "timestep_bias_strategy": "later",
                                                                "timestep_bias_multiplier": 2.0}})

    torch.manual_seed(0)
    straight = make_adapter(tiny_sd, **sections)
    chosen = straight.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    stats = straight.finetune(chosen)
    straight.finetune(chosen)
    assert stats["samples"] == 3 * 2 * 2

    torch.manual_seed(0)
    first = make_adapter(tiny_sd, **sections)
    first.finetune(chosen)
    first.save(tmp_path / "ckpt")
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "trainable.safetensors", "optimizer.bin", "random_states_0.pkl", "finetuner.json", "train_generator.safetensors",
        "ema.safetensors"}

    torch.manual_seed(99)  # the restored RNG, not this, must drive the second stage
    resumed = make_adapter(tiny_sd, **sections)
    resumed.load(tmp_path / "ckpt")
    resumed.finetune(chosen)

    expected, got = straight.lora_state_dict(), resumed.lora_state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(expected[k], first.lora_state_dict()[k]) for k in expected)  # stage 2 did train
    with straight.finetuner.averaged(), resumed.finetuner.averaged():
        expected, got = straight.lora_state_dict(), resumed.lora_state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected)


# ---------------------------------------------------------------------------------------------
# Export, the sample command


def test_export_loads_in_a_stock_pipeline_with_the_same_images(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion import sampling

    # alpha != rank: the scale must travel with the file; a text-encoder LoRA too.
    adapter = make_adapter(tiny_sd, model={"lora": {"rank": 4, "alpha": 2.0}}, diffusion={"text_encoder_lora": True})
    prompts, seeds = ["a cat", "a dog"], [5, 6, 7, 8]
    chosen = adapter.generate(prompts, 2, seeds)
    assert chosen[0].payload["input_ids"].shape == (77,)  # the text encoder trains: ids, re-encoded
    adapter.finetune(chosen)
    ours = adapter.generate(prompts, 2, seeds)
    adapter.export(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)

    def stock(output_type):
        return pipe(prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0, output_type=output_type,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    base = stock("latent")
    messages = load_lora_collecting_messages(pipe, tmp_path / "lora")
    assert not [m for m in messages if "unexpected" in m.lower()]

    with_lora = stock("latent")
    assert (base - latents(ours)).abs().max() > 1e-3  # the LoRA changes the samples ...
    torch.testing.assert_close(with_lora, latents(ours), atol=1e-5, rtol=1e-5)  # ... and the stock pipeline agrees
    assert np.abs(np.round(stock("np") * 255).astype(np.int16) - pixels(ours)).max() <= 1

    # `raft-diffusion sample --lora` draws the same images from the same seeds.
    import argparse

    args = sampling.build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", tiny_sd, "--lora", str(tmp_path / "lora"), "--prompt", "a cat", "--prompt", "a dog", "--n", "2",
         "--seed", "5", "--steps", "4", "--guidance-scale", "2.0", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "out")]
    )
    assert sampling.run(args) == 0
    files = sorted((tmp_path / "out").glob("0*.png"))
    assert [f.name for f in files] == ["000_seed5.png", "001_seed6.png", "002_seed7.png", "003_seed8.png"]
    from PIL import Image

    written = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])
    assert np.array_equal(written, pixels(ours))
    assert Image.open(tmp_path / "out" / "grid.png").size == (32, 32)


def test_moving_average_samples_and_exports(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    adapter = make_adapter(tiny_sd, train={"ema_decay": 0.5})
    prompts, seeds = ["a cat", "a dog"], [5, 6, 7, 8]
    chosen = adapter.generate(prompts, 2, seeds)
    for _ in range(2):
        adapter.finetune(chosen)
    averaged = adapter.generate(prompts, 2, seeds)
    with adapter.finetuner.averaged():
        average = {k: v.clone() for k, v in adapter.lora_state_dict().items()}
    ema, adapter.finetuner.ema = adapter.finetuner.ema, None
    trained = adapter.generate(prompts, 2, seeds)  # the trained weights themselves
    adapter.finetuner.ema = ema
    assert (latents(averaged) - latents(trained)).abs().max() > 1e-3

    adapter.export(tmp_path / "lora")
    assert not all(torch.equal(a, b) for a, b in zip(average.values(), adapter.lora_state_dict().values()))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    load_lora_collecting_messages(pipe, tmp_path / "lora")
    stock = pipe(prompts, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=2.0, output_type="latent",
                 generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    torch.testing.assert_close(stock, latents(averaged), atol=1e-5, rtol=1e-5)  # the average is what is exported


# ---------------------------------------------------------------------------------------------
# KL-shaped ranking


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_log_ratio_is_zero_before_training_and_not_after(tiny_sd, scheduler):
    from diffusers import DDIMScheduler, DDPMScheduler

    adapter = make_adapter(tiny_sd, diffusion={"scheduler": scheduler, "eta": 1.0}, selection={"beta": 0.1})
    assert has_log_ratio(adapter)

    # The recorded transitions are the scheduler's own: same mean and noise as its step().
    adapter.scheduler.set_timesteps(4)
    coeffs = adapter._step_coefficients()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(adapter.scheduler.timesteps):
        mean, std = adapter._transition(out, x, coeffs[i])
        if isinstance(adapter.scheduler, DDIMScheduler):
            noise = torch.randn(2, 4, 8, 8, generator=g)
            ref = adapter.scheduler.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample
        else:
            assert isinstance(adapter.scheduler, DDPMScheduler)
            ref = adapter.scheduler.step(out, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) if t > 0 else torch.zeros_like(x)
        torch.testing.assert_close(mean + std * noise, ref, atol=1e-5, rtol=1e-5)

    cands = adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    assert cands[0].payload["trajectory"].shape == (5, 4, 8, 8)
    assert torch.equal(cands[0].payload["trajectory"][-1], cands[0].payload["latents"])
    assert adapter.log_ratio(cands).abs().max() < 1e-3

    adapter.finetune(cands)
    ratio = adapter.log_ratio(adapter.generate(["a cat", "a dog"], 2, [0, 1, 2, 3]))
    assert ratio.shape == (4,) and ratio.dtype == torch.float32
    assert ratio.abs().min() > 1e-2 and ratio.mean() > 0  # on average log p/p0 estimates KL(p || p0) >= 0


def test_log_ratio_needs_stochastic_sampling():
    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    with pytest.raises(ValueError) as err:  # refused before any model is loaded
        DiffusionAdapter(make_config("/nowhere", selection={"beta": 0.1}, diffusion={"eta": 0.0}), _accelerator())
    assert "diffusion.eta" in str(err.value) and one_line(err)


# ---------------------------------------------------------------------------------------------
# Errors


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("name", ["/no/such/folder", "stable-diffusion-v1-5/stable-diffusion-v1-5"])
def test_missing_model_is_one_clear_line(name):
    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    with pytest.raises(FileNotFoundError) as err:
        DiffusionAdapter(make_config(name), _accelerator())
    assert name in str(err.value) and "model.pretrained=/path/to/folder" in str(err.value) and one_line(err)


def test_lora_made_for_another_model_is_refused(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.adapters.diffusion import DiffusionAdapter, LoraError

    # to_q of this UNet's first attention takes 32 features; this LoRA was made for 64.
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "other"), unet_lora_layers={f"{name}.lora.down.weight": torch.zeros(4, 64), f"{name}.lora.up.weight": torch.zeros(32, 4)}
    )
    with pytest.raises(LoraError) as err:
        DiffusionAdapter(make_config(tiny_sd, model={"init_lora": str(tmp_path / "other")}), _accelerator())
    assert "another model" in str(err.value) and one_line(err)
    with pytest.raises(LoraError) as err:
        DiffusionAdapter(make_config(tiny_sd, model={"init_lora": str(tmp_path / "missing")}), _accelerator())
    assert "not found" in str(err.value) and one_line(err)


# ---------------------------------------------------------------------------------------------
# Configs


def test_paper_configs_are_valid():
    c = load_config("configs/sd15_aesthetic_256.yaml")
    assert (c.model.pretrained, c.adapter.scheduler, c.adapter.height, c.sampling.k, c.sampling.prompts_per_stage) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5", "dpm++", 256, 10, 10)
    assert (c.selection.strategy, c.selection.keep, c.model.lora.rank, c.train.lr, c.train.steps_per_stage, c.train.batch_size) == (
        "local_then_global", 0.8, 4, 9e-6, 80, 8)
    assert (c.adapter.steps, c.adapter.guidance_scale, c.train.mixed_precision, c.run.stages, c.prompts.builtin) == (
        50, 7.5, "bf16", 10, "cifar10")
    assert c.rewards[0]["name"] == "aesthetic" and c.rewards[0]["args"] == {"clip": "ViT-L-14", "pretrained": "openai"}
    d = load_config("configs/sd15_aesthetic_512.yaml")
    assert (d.adapter.height, d.adapter.scheduler, d.adapter.steps, d.adapter.guidance_scale, d.adapter.eta, d.prompts.builtin) == (
        512, "ddim", 50, 5.0, 1.0, "simple_animals")
