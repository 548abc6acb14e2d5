"""Train the demo world's flow-matching model on CPU: a tiny Stable Diffusion 3 beside the tiny SD.

``sd3/`` is a ``StableDiffusion3Pipeline.save_pretrained`` folder: an MMDiT ``SD3Transformer2DModel``
trained with the rectified-flow objective on the scenes, captions and splits the tiny SD learnt, over
the tiny SD's own autoencoder (``shift_factor`` 0, as SD3's pipeline needs one) and its text encoder,
which serves as both CLIP encoders (``CLIPTextModelWithProjection``, an identity projection onto its
pooled output). There is no T5 (``text_encoder_3`` is None): the pipeline appends zeros, and the demo
samples with ``max_sequence_length`` 1. The CLIP tokenizer pads to ``clip_tokens``, enough for every
caption of the world. Text encoders stay frozen: their encodings of the world's 108 captions and of
the empty prompt are computed once, and only the transformer is trained.

The functions take their sizes from :class:`FlowBuildConfig`, so tests run the whole chain in seconds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from raft_diffusion.demo import world
from scripts.demo.build_image import (EMA, _alignment_figures, _jsonable, _log, _set_lr, encode_latents,
                                      images_to_tensor)


@dataclass
class FlowBuildConfig:
    seed: int = 0
    threads: int = 1
    n_scenes: int = 30000  # the scenes the tiny SD learnt from (same seed, same split)
    clip_tokens: int = 12  # the longest caption is 9 tokens with its start and end
    t5_tokens: int = 1  # zero "T5" tokens the pipeline appends (max_sequence_length)
    # transformer
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    patch: int = 2
    qk_norm: str | None = "rms_norm"  # as SD3.5
    # training
    steps: int = 2400
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 100
    # A second run of the same training from the first run's EMA weights (fresh optimizer and
    # schedule), as the tiny SD's build does: shapes are learnt late, colours early.
    refine_steps: int = 3200
    refine_lr: float = 2e-3
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    logit_mean: float = 0.0  # logit-normal noise levels, SD3's default
    logit_std: float = 1.0
    shift: float = 1.0  # the scheduler's shift: with SD3's 3.0 shapes came no faster (800 steps)
    # sampling settings the demo uses (and the figures in the manifest are measured with)
    sample_steps: int = 15
    guidance: float = 5.0
    eval_samples: int = 240
    curve_every: int = 400  # the EMA weights' validation alignment and gold on 48 samples, into the manifest

    @classmethod
    def quick(cls, seed: int = 0) -> "FlowBuildConfig":
        """A smoke-test build: same code paths, a transformer of one block, seconds of training."""
        return cls(seed=seed, n_scenes=256, layers=1, heads=2, head_dim=8, steps=3, batch=8, warmup=1,
                   refine_steps=3, sample_steps=2, eval_samples=8, curve_every=2)

    def refine(self) -> "FlowBuildConfig":
        """The settings of the second phase."""
        return replace(self, seed=self.seed + 100, steps=self.refine_steps, lr=self.refine_lr,
                       warmup=min(50, self.refine_steps))


def make_scheduler(cfg: FlowBuildConfig):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def make_transformer(cfg: FlowBuildConfig, latent_size: int, text_dim: int, pooled_dim: int):
    from diffusers import SD3Transformer2DModel

    width = cfg.heads * cfg.head_dim
    return SD3Transformer2DModel(
        sample_size=latent_size, patch_size=cfg.patch, in_channels=4, out_channels=4, num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads, joint_attention_dim=text_dim,
        caption_projection_dim=width, pooled_projection_dim=pooled_dim,
        pos_embed_max_size=2 * latent_size // cfg.patch,  # room for pictures up to twice the demo's size
        qk_norm=cfg.qk_norm,
    )


def clip_with_projection(text_encoder_dir: Path):
    """The tiny SD's ``CLIPTextModel`` as a ``CLIPTextModelWithProjection`` whose projection is the identity."""
    from transformers import CLIPTextModelWithProjection
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the projection is missing from the checkpoint by design
    try:
        model = CLIPTextModelWithProjection.from_pretrained(str(text_encoder_dir))
    finally:
        logging.set_verbosity(verbosity)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.config.hidden_size, model.config.projection_dim))
    return model.eval()


def make_pipeline(sd_dir: Path, cfg: FlowBuildConfig):
    """A ``StableDiffusion3Pipeline`` of the tiny SD's VAE, tokenizer and text encoder, and a new transformer."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(str(sd_dir / "vae")).eval()
    vae.register_to_config(shift_factor=0.0)
    latent_size = world.SIZE // 2 ** (len(vae.config.block_out_channels) - 1)
    tokenizer = CLIPTokenizer.from_pretrained(str(sd_dir / "tokenizer"), model_max_length=cfg.clip_tokens)
    text_encoder = clip_with_projection(sd_dir / "text_encoder")
    text_encoder_2 = clip_with_projection(sd_dir / "text_encoder")
    hidden = text_encoder.config.hidden_size
    torch.manual_seed(cfg.seed + 50)
    transformer = make_transformer(cfg, latent_size, text_dim=2 * hidden, pooled_dim=2 * text_encoder.config.projection_dim)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(cfg), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], cfg: FlowBuildConfig) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                              do_classifier_free_guidance=False, max_sequence_length=cfg.t5_tokens)
    return embeds, pooled


def train_transformer(pipe, latent_mean, latent_std, prompt_index, prompts, cfg: FlowBuildConfig,
                      log: Callable = _log, callback: Callable | None = None) -> dict:
    """Rectified flow, as diffusers' SD3 DreamBooth script trains it (logit-normal noise levels on the
    scheduler's grid, velocity target, no loss weighting); leaves the EMA weights in ``pipe.transformer``.

    ``prompt_index[i]`` is the index in ``prompts`` of picture ``i``'s caption.
    ``callback(step, pipe, ema)``, if given, runs after every step.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    transformer, vae = pipe.transformer, pipe.vae
    embeds, pooled = encode_prompts(pipe, list(prompts) + [""], cfg)
    uncond = len(prompts)
    grid = make_scheduler(cfg)  # never set_timesteps'd: its sigmas are the training grid
    torch.manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA(transformer, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    transformer.train()
    losses, start = [], time.time()
    for step in range(cfg.steps):
        _set_lr(opt, cfg.lr, step, cfg.steps, cfg.warmup)
        idx = torch.randint(len(latent_mean), (cfg.batch,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
        cond = prompt_index[idx].clone()
        cond[torch.rand(cfg.batch, generator=gen) < cfg.uncond_prob] = uncond
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling("logit_normal", cfg.batch, cfg.logit_mean, cfg.logit_std,
                                                  generator=gen)
        index = (u * grid.config.num_train_timesteps).long().clamp(max=len(grid.timesteps) - 1)
        sigma = grid.sigmas[index].view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred = transformer(hidden_states=noisy, timestep=grid.timesteps[index], encoder_hidden_states=embeds[cond],
                           pooled_projections=pooled[cond], return_dict=False)[0]
        loss = ((pred - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        ema.update(transformer, step)
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"transformer step {step}/{cfg.steps} loss {np.mean(losses[-100:]):.4f} "
                f"({(time.time() - start) / (step + 1):.2f} s/step)")
        if callback is not None:
            callback(step, pipe, ema)
    ema.copy_to(transformer)
    transformer.eval()
    return {"transformer_loss": float(np.mean(losses[-100:])), "transformer_steps": cfg.steps}


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, cfg: FlowBuildConfig, batch: int = 64):
    """One image per prompt with the stock pipeline; image ``i`` is drawn from seed ``seed + i``."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe(chunk, height=world.SIZE, width=world.SIZE, num_inference_steps=cfg.sample_steps,
                       guidance_scale=cfg.guidance, max_sequence_length=cfg.t5_tokens, generator=generators,
                       output_type="pil").images
    return images


def evaluate(pipe, cfg: FlowBuildConfig, n: int | None = None, split: str = "eval") -> dict:
    """Gold alignment and gold aesthetic of samples on the held-out prompts (``split`` "eval": the tiny
    SD's figures' prompts and seeds) or on the validation prompts ("val": what build choices are made on)."""
    prompt_list = {"eval": world.eval_prompts, "val": world.val_prompts}[split]()
    prompts = [prompt_list[i % len(prompt_list)] for i in range(n or cfg.eval_samples)]
    start = time.time()
    images = sample_images(pipe, prompts, cfg.seed + 10_000, cfg)
    gold = world.gold_aesthetic(images)
    return {"sample_seconds_per_image": round((time.time() - start) / len(images), 4),
            f"sd3_{split}_alignment": _alignment_figures(images, prompts),
            f"sd3_{split}_gold": {"mean": round(float(gold.mean()), 3), "std": round(float(gold.std()), 3)}}


def build_flow_assets(out_dir: str | Path, sd_dir: str | Path, cfg: FlowBuildConfig | None = None,
                      log: Callable = _log) -> dict:
    """Train and save ``sd3/`` into ``out_dir`` on top of the tiny SD in ``sd_dir``; returns the figures."""
    cfg = cfg or FlowBuildConfig()
    out_dir, sd_dir = Path(out_dir), Path(sd_dir)
    torch.set_num_threads(cfg.threads)
    figures: dict = {"config": _jsonable(asdict(cfg))}
    timings: dict[str, float] = {}

    start = time.time()
    scenes = world.sample_scenes(cfg.n_scenes, cfg.seed, "all")
    prompts = world.all_prompts()
    prompt_of = {p: i for i, p in enumerate(prompts)}
    prompt_index = torch.tensor([prompt_of[world.caption(s)] for s in scenes])
    pipe = make_pipeline(sd_dir, cfg)
    mean, std = encode_latents(pipe.vae, images_to_tensor(world.render_many(scenes)))
    timings["latents"] = round(time.time() - start, 1)

    start = time.time()
    figures["transformer_parameters"] = sum(p.numel() for p in pipe.transformer.parameters())
    curve = []

    def curve_recorder(phase: FlowBuildConfig, offset: int):
        def record(step, pipe, ema):
            if cfg.curve_every and (step + 1) % cfg.curve_every == 0 and step + 1 < phase.steps:
                trained = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
                ema.copy_to(pipe.transformer)
                pipe.transformer.eval()
                point = evaluate(pipe, cfg, n=48, split="val")
                curve.append({"step": offset + step + 1, "alignment": point["sd3_val_alignment"]["both"],
                              "gold": point["sd3_val_gold"]["mean"]})
                log(f"EMA at step {offset + step + 1}: {curve[-1]}")
                pipe.transformer.load_state_dict(trained)
                pipe.transformer.train()
        return record

    figures.update(train_transformer(pipe, mean, std, prompt_index, prompts, cfg, log, callback=curve_recorder(cfg, 0)))
    if cfg.refine_steps:
        stats = train_transformer(pipe, mean, std, prompt_index, prompts, cfg.refine(), lambda msg: log("refine " + msg),
                                  callback=curve_recorder(cfg.refine(), cfg.steps))
        figures.update(transformer_refine_loss=stats["transformer_loss"], transformer_refine_steps=stats["transformer_steps"])
    figures["curve_48_val"] = curve
    timings["transformer"] = round(time.time() - start, 1)
    pipe.save_pretrained(str(out_dir / "sd3"), safe_serialization=True)

    start = time.time()
    figures.update(evaluate(pipe, cfg, split="val"))
    figures.update(evaluate(pipe, cfg, split="eval"))
    timings["sample"] = round(time.time() - start, 1)
    for split, name in (("val", "validation"), ("eval", "held-out")):
        log(f"tiny SD3 on {name} prompts: alignment {figures[f'sd3_{split}_alignment']} gold {figures[f'sd3_{split}_gold']}")
    figures["seconds"] = timings
    figures["sampler"] = {"scheduler": "FlowMatchEulerDiscreteScheduler", "shift": cfg.shift, "steps": cfg.sample_steps,
                          "guidance": cfg.guidance, "max_sequence_length": cfg.t5_tokens}
    return figures
