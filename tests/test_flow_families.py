"""SD3 and FLUX.1 on the diffusion adapter: tiny random-weight folders built offline (scripts/demo/random_flow.py)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from scripts.demo.random_flow import build_flux, build_sd3
from tests.sd_fixtures import load_lora_collecting_messages
from tests.test_diffusion_adapter import _merge, latents, one_line, pixels

STEPS, SIZE = 3, 16
BASE = {
    "run": {"seed": 0},
    "sampling": {"batch_size": 4},
    "diffusion": {"steps": STEPS, "height": SIZE, "width": SIZE, "max_sequence_length": 16},
    "train": {"steps_per_stage": 4, "batch_size": 2, "lr": 3e-2},
}


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return str(build_sd3(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return str(build_flux(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(params=["sd3", "flux"])
def family(request, tiny_sd3, tiny_flux):
    """(name, folder, stock pipeline class, the stock call's guidance keyword and value)."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if request.param == "sd3":
        return "sd3", tiny_sd3, StableDiffusion3Pipeline, 2.0
    return "flux", tiny_flux, FluxPipeline, 3.5


def make_config(folder: str, **sections):
    from raft_diffusion.core.config import from_dict

    return from_dict(_merge(_merge(BASE, {"model": {"pretrained": folder}}), sections))


def make_adapter(folder: str, guidance: float, **sections):
    from accelerate import Accelerator

    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    config = make_config(folder, **_merge({"diffusion": {"guidance_scale": guidance}}, sections))
    return DiffusionAdapter(config, Accelerator(gradient_accumulation_steps=config.train.grad_accum, cpu=True))


def stock_images(pipe, prompts, seeds, guidance, output_type="latent"):
    out = pipe(prompts, num_images_per_prompt=len(seeds) // len(prompts), num_inference_steps=STEPS, guidance_scale=guidance,
               height=SIZE, width=SIZE, max_sequence_length=16, output_type=output_type,
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    if output_type == "latent" and out.dim() == 3:  # FLUX returns packed latents
        out = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


def test_export_loads_in_the_stock_pipeline_with_the_same_images(family, tmp_path):
    from raft_diffusion import sampling

    name, folder, pipeline_cls, guidance = family
    adapter = make_adapter(folder, guidance)
    prompts, seeds = ["a cat", "a dog"], [5, 6, 7, 8]
    chosen = adapter.generate(prompts, 2, seeds)
    assert chosen[0].payload["latents"].shape == (4, 8, 8)
    stats = adapter.finetune(chosen)
    assert stats["loss_last"] < stats["loss_first"] * 2 and np.isfinite(stats["loss"])
    ours = adapter.generate(prompts, 2, seeds)
    adapter.export(tmp_path / "lora")

    pipe = pipeline_cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    base = stock_images(pipe, prompts, seeds, guidance)
    torch.testing.assert_close(base, latents(chosen), atol=1e-5, rtol=1e-5)  # the stock pipeline's samples, seed for seed
    messages = load_lora_collecting_messages(pipe, tmp_path / "lora")
    problems = [m for m in messages if not m.startswith("No LoRA keys associated")]  # that one: no text-encoder LoRA
    assert not [m for m in problems if "unexpected" in m.lower() or "inconsisten" in m.lower()]
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    n_tensors = len(load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    injected = [m for m in pipe.transformer.modules() if isinstance(m, LoraLayer)]
    assert n_tensors == 2 * len(injected) > 0  # every layer the file holds is loaded
    with_lora = stock_images(pipe, prompts, seeds, guidance)
    assert (base - latents(ours)).abs().max() > 1e-3  # the LoRA changes the samples ...
    torch.testing.assert_close(with_lora, latents(ours), atol=1e-5, rtol=1e-5)  # ... and the stock pipeline agrees
    assert np.abs(np.round(stock_images(pipe, prompts, seeds, guidance, "np") * 255).astype(np.int16) - pixels(ours)).max() <= 1

    # `raft-diffusion sample --lora` with the same settings draws the same images.
    args = sampling.build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", folder, "--lora", str(tmp_path / "lora"), "--prompt", "a cat", "--prompt", "a dog", "--n", "2", "--seed", "5",
         "--steps", str(STEPS), "--guidance-scale", str(guidance), "--height", str(SIZE), "--width", str(SIZE),
         "--max-sequence-length", "16", "--device", "cpu", "--out", str(tmp_path / "out")])
    from PIL import Image

    assert sampling.run(args) == 0
    files = sorted((tmp_path / "out").glob("0*.png"))
    written = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files])
    assert np.array_equal(written, pixels(ours))


def _script_loss(pipe, name, x0, embeds, pooled, noise, index, guidance):
    """The loss of diffusers' train_dreambooth_lora_sd3.py / _flux.py for one batch, written out as the scripts
    compute it (uniform weighting, no preconditioning; the indices they draw are given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    timesteps = scheduler.timesteps[index]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    if name == "sd3":
        pred = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                pooled_projections=pooled, return_dict=False)[0]
    else:
        b, c, h, w = x0.shape
        packed = pipe._pack_latents(noisy, b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3)
        pred = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([guidance]).expand(b),
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                                return_dict=False)[0]
        pred = pipe._unpack_latents(pred, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)
    weighting = compute_loss_weighting_for_sd3("none", sigmas)
    target = noise - x0
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(len(x0), -1), 1).mean()


def test_flow_loss_is_the_diffusers_training_scripts_loss(family):
    name, folder, _, guidance = family
    adapter = make_adapter(folder, guidance, diffusion={"flow": {"weighting_scheme": "uniform"}})
    chosen = adapter.generate(["a cat", "a dog"], 1, [0, 1])
    x0 = latents(chosen)
    embeds = torch.stack([c.payload["prompt_embeds"] for c in chosen])
    pooled = torch.stack([c.payload["pooled_prompt_embeds"] for c in chosen])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    index = torch.tensor([100, 800])
    with torch.no_grad():
        ours = adapter.denoising_loss(x0, {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, noise, index)
        theirs = _script_loss(adapter.pipe, name, x0, embeds, pooled, noise, index, guidance)
    assert ours.item() > 0
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    drawn = torch.cat([adapter.objective.draw(64, torch.Generator().manual_seed(i)) for i in range(4)])
    assert drawn.min() >= 0 and drawn.max() < 1000 and drawn.float().std() > 100  # the uniform density


def test_a_negative_logit_mean_draws_the_noisier_levels():
    # The sign configs/demo_flow.yaml and its recipe rely on: diffusers' scripts index the schedule from
    # its noisiest level, so logit_mean -1 trains mostly sigma above one half, +1.5 mostly below it.
    from raft_diffusion.adapters.diffusion.objectives.flow_matching import FlowMatchingObjective
    from raft_diffusion.adapters.diffusion.settings import FlowSettings

    def sigmas(logit_mean):
        objective = FlowMatchingObjective({"num_train_timesteps": 1000, "shift": 1.0}, FlowSettings(logit_mean=logit_mean))
        index = objective.draw(4000, torch.Generator().manual_seed(0))
        return objective.sigmas(index, torch.zeros(len(index))).flatten()

    noisy, clean = sigmas(-1.0), sigmas(1.5)
    assert 0.68 < noisy.median() < 0.78 and (noisy > 0.5).float().mean() > 0.8
    assert 0.13 < clean.median() < 0.23 and (clean < 0.5).float().mean() > 0.9


def test_save_load_resumes_bit_for_bit(tiny_flux, tmp_path):
    sections = dict(train={"grad_accum": 2, "steps_per_stage": 2}, diffusion={"flow": {"weighting_scheme": "logit_normal"}})
    torch.manual_seed(0)
    straight = make_adapter(tiny_flux, 3.5, **sections)
    chosen = straight.generate(["a cat", "a dog"], 2, [0, 1, 2, 3])
    straight.finetune(chosen)
    straight.save(tmp_path / "ckpt")
    second = straight.finetune(chosen)

    resumed = make_adapter(tiny_flux, 3.5, **sections)
    resumed.load(tmp_path / "ckpt")
    again = resumed.finetune(chosen)
    assert again["loss"] == second["loss"]
    a, b = straight.lora_state_dict(), resumed.lora_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and any(k.startswith("transformer.") for k in a)


def test_a_setting_that_means_nothing_for_the_family_is_one_line(tiny_sd3, tiny_flux):
    from raft_diffusion.core.errors import UserError

    cases = [(tiny_sd3, {"ddpm": {"snr_gamma": 5.0}}, "diffusion.ddpm", "Stable Diffusion 3"),
             (tiny_sd3, {"eta": 1.0}, "diffusion.eta", "Stable Diffusion 3"),
             (tiny_sd3, {"text_encoder_lora": True}, "diffusion.text_encoder_lora", "Stable Diffusion 3"),
             (tiny_flux, {"negative_prompt": "blurry"}, "diffusion.negative_prompt", "FLUX.1"),
             (tiny_flux, {"guidance_rescale": 0.7}, "diffusion.guidance_rescale", "FLUX.1")]
    for folder, diffusion, key, family_name in cases:
        with pytest.raises(UserError) as err:
            make_adapter(folder, 2.0, diffusion=diffusion)
        assert key in str(err.value) and family_name in str(err.value) and one_line(err)
    with pytest.raises(UserError) as err:
        make_adapter(tiny_sd3, 2.0, diffusion={"scheduler": "ddim"})
    assert "flow-matching" in str(err.value) and one_line(err)


def test_a_family_is_added_without_touching_the_adapter(tiny_sd3):
    """A model family is one class registered by the pipeline class it runs: here a variant of the SD3 family
    with other default LoRA targets."""
    from raft_diffusion.adapters.diffusion import register_family
    from raft_diffusion.adapters.diffusion.families import FAMILIES
    from raft_diffusion.adapters.diffusion.families.sd3 import StableDiffusion3Family

    class FeedForwardSD3(StableDiffusion3Family):
        name = "SD3 (feed-forward LoRA)"
        pipelines = ("StableDiffusion3Pipeline",)
        lora_targets = ["ff.net.0.proj", "ff.net.2"]

    register_family(FeedForwardSD3)
    try:
        adapter = make_adapter(tiny_sd3, 2.0)
        assert isinstance(adapter.family, FeedForwardSD3)
        names = {n for n, _ in adapter.denoiser.named_modules() if n.endswith("lora_A")}
        assert names and all(".ff." in n for n in names)
    finally:
        FAMILIES.remove(FeedForwardSD3)
    assert not isinstance(make_adapter(tiny_sd3, 2.0).family, FeedForwardSD3)


def test_prompt_conditioning_is_kept_once_per_prompt(tiny_flux, tmp_path):
    """K candidates of a prompt share one copy of its embeddings: in memory, when gathered (pickled) and in
    the replay pool's checkpoint, which shares it again when loaded."""
    import pickle

    from safetensors.torch import load_file

    from raft_diffusion.core.replay import TENSORS_FILE, ReplayPool

    adapter = make_adapter(tiny_flux, 3.5, replay={"anchor_share": 0.5, "anchor_samples": 8})
    prompts, k = ["a cat", "a dog"], 4
    candidates = adapter.generate(prompts, k, list(range(len(prompts) * k)))
    embeds = [c.payload["prompt_embeds"] for c in candidates]
    assert len({id(e) for e in embeds}) == len(prompts)
    assert all(embeds[i] is embeds[i - i % k] for i in range(len(embeds)))
    per_prompt = embeds[0].numel() * embeds[0].element_size()
    light = [type(c)(c.prompt, c.seed, None, c.payload, c.prompt_index, c.k_index) for c in candidates]
    assert len(pickle.dumps(light)) < (len(prompts) + 1) * per_prompt + len(candidates) * 4096

    pool = ReplayPool(adapter.config, seed=0)
    pool.add_anchors(1, candidates, [0.0] * len(candidates))
    pool.save(tmp_path)
    stored = load_file(str(tmp_path / TENSORS_FILE))
    assert sum(1 for name in stored if name.endswith("/prompt_embeds")) == len(prompts)
    loaded = ReplayPool(adapter.config, seed=0)
    loaded.load(tmp_path)
    again = [e.candidate.payload["prompt_embeds"] for e in loaded.entries]
    assert len({id(e) for e in again}) == len(prompts)
    assert all(torch.equal(a, b) for a, b in zip(again, (e.candidate.payload["prompt_embeds"] for e in pool.entries)))


@pytest.mark.parametrize("name", ["sd35_medium_aesthetic_512", "flux_dev_aesthetic_512"])
def test_the_real_configs_build_an_adapter_for_their_family(name, tiny_sd3, tiny_flux):
    """The shipped SD3.5 / FLUX.1-dev configs, pointed at a tiny folder of the same family: every setting
    means something for it, and the LoRA targets exist in both streams."""
    from accelerate import Accelerator

    from raft_diffusion.adapters.diffusion import DiffusionAdapter
    from raft_diffusion.core.config import load_config

    folder = tiny_sd3 if name.startswith("sd35") else tiny_flux
    config = load_config(f"configs/{name}.yaml", [f"model.pretrained={folder}", "model.dtype=float32", "train.mixed_precision=no",
                                                  "diffusion.height=16", "diffusion.width=16"])
    adapter = DiffusionAdapter(config, Accelerator(gradient_accumulation_steps=config.train.grad_accum, cpu=True))
    assert adapter.family.objective == "flow" and adapter.settings.offload_text_encoders
    adapted = {n.removesuffix(".lora_A").rsplit(".", 1)[-1] for n, _ in adapter.denoiser.named_modules() if n.endswith(".lora_A")}
    assert {"to_q", "add_q_proj"} <= adapted
    assert all(p.device.type == "cpu" for e in adapter.text_encoders for p in e.parameters())


def test_sample_without_flags_is_the_stock_pipelines_image(tiny_sd3, tmp_path):
    """`raft-diffusion sample` with no sampling flags: SD3's own defaults (28 steps, guidance 7, 256 T5
    tokens, the folder's scheduler, the model's size), image j from seed --seed + j."""
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    from raft_diffusion import sampling

    args = sampling.build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", tiny_sd3, "--prompt", "a cat", "--n", "1", "--seed", "7", "--device", "cpu", "--out", str(tmp_path)])
    assert sampling.run(args) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe("a cat", generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    ours = np.asarray(Image.open(tmp_path / "000_seed7.png").convert("RGB"), dtype=np.int16)
    assert ours.shape == (16, 16, 3)
    assert np.abs(np.round(stock * 255).astype(np.int16) - ours).max() <= 1
