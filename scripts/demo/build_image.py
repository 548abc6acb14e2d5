"""Train the demo world's image models on CPU: a tiny Stable Diffusion, a tiny CLIP, an aesthetic head.

Everything is deterministic in one seed and saved in the formats the real models use:

* ``sd/``: a ``StableDiffusionPipeline.save_pretrained`` folder (AutoencoderKL, CLIPTextModel with a
  word-level CLIPTokenizer of the world's vocabulary, UNet2DConditionModel, DDIM scheduler);
* ``clip/``: ``open_clip_model.safetensors`` and the open_clip model config, as ``model_config.json``,
  ``demo-clip.json`` (``open_clip.add_model_config`` names a model after the file) and
  ``open_clip_config.json`` (for ``open_clip.create_model_and_transforms("local-dir:<clip>")``);
  :func:`load_clip` loads it;
* ``aesthetic_head.pth``: a LAION aesthetic MLP head on the demo CLIP's L2-normalised image embedding.

The functions take their sizes from :class:`ImageBuildConfig`, so tests run the whole chain in seconds.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raft_diffusion.demo import world
from scripts.demo.random_sd import bytes_to_unicode

CLIP_MODEL_NAME = "demo-clip"
SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class ImageBuildConfig:
    seed: int = 0
    threads: int = 1  # one thread per build: on shared cores two OpenMP threads ran 3-4x slower
    # data
    n_scenes: int = 30000  # rendered training pictures (all prompts; see ``scene_split``)
    scene_split: str = "all"  # the base models learn the whole world; the RAFT loop splits prompts
    # VAE
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    # text encoder (trained with the UNet)
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    # UNet
    unet_channels: tuple[int, ...] = (32, 64)
    unet_attention: tuple[bool, ...] = (False, True)  # cross-attention per resolution (16x16 costs most)
    unet_cross_dim: int = 64
    unet_heads: int = 4
    unet_pooled_text: bool = True  # also add a pooled caption embedding to the time embedding
    unet_steps: int = 1600
    unet_batch: int = 64
    unet_lr: float = 3e-3
    unet_warmup: int = 150
    # A second run of the same training from the first run's EMA weights (fresh optimizer and
    # schedule): shapes are learnt late, and a second high learning-rate phase gets them there.
    unet_refine_steps: int = 800
    unet_refine_lr: float = 2e-3
    ema_decay: float = 0.999
    uncond_prob: float = 0.1  # caption dropped, for classifier-free guidance
    min_snr_gamma: float = 5.0
    # sampling settings the demo uses (and the figures in the manifest are measured with)
    sample_steps: int = 15
    guidance: float = 5.0
    # tiny-SD samples on train prompts: CLIP and the head learn from the pictures they will rank
    train_samples: int = 6000
    # CLIP
    clip_embed_dim: int = 64
    clip_vision_width: int = 64
    clip_vision_layers: int = 3
    clip_patch: int = 8  # 4x4 patches of 8x8 pixels: a quarter of the cost of 4-pixel patches
    clip_text_width: int = 32  # the open_clip tokenizer has 49408 tokens: the embedding table dominates size
    clip_text_layers: int = 2
    clip_context_length: int = 24
    clip_layout_share: float = 0.7  # captions with layout words; the rest are the short prompts
    clip_steps: int = 5000  # the contrastive loss still falls at 3000 steps
    clip_batch: int = 128
    clip_lr: float = 2e-3
    # aesthetic head
    head_hidden: tuple[int, ...] = (1024, 128, 64, 16)
    head_renders: int = 6000
    head_steps: int = 3000
    head_lr: float = 1e-3
    # evaluation
    eval_samples: int = 240  # tiny-SD samples on held-out prompts for the manifest figures
    eval_recon: int = 1000

    @classmethod
    def quick(cls, seed: int = 0) -> "ImageBuildConfig":
        """A smoke-test build: same code paths, models of a few thousand parameters, seconds of training."""
        return cls(
            seed=seed, n_scenes=256, vae_channels=(8, 16), vae_steps=3, vae_batch=8,
            text_width=16, text_layers=1, text_heads=2, unet_channels=(16, 32), unet_cross_dim=16, unet_attention=(False, True),
            unet_heads=2, unet_steps=3, unet_batch=8, unet_warmup=1, unet_refine_steps=2, sample_steps=2,
            clip_embed_dim=16, clip_vision_width=16, clip_vision_layers=1, clip_text_width=8,
            clip_text_layers=1, clip_steps=3, clip_batch=8, head_hidden=(32, 16, 8, 4),
            head_renders=32, train_samples=8, head_steps=5, eval_samples=8, eval_recon=16,
        )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float tensor [N, 3, H, W] in [-1, 1]."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    array = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _set_lr(opt: torch.optim.Optimizer, peak: float, step: int, total: int, warmup: int | None = None) -> None:
    """Linear warm-up (by default a tenth of the run, at most 100 steps), then cosine decay to a tenth."""
    warmup = min(100, total // 10 + 1) if warmup is None else warmup
    for group in opt.param_groups:
        group["lr"] = peak * _cosine_lr(step, total, warmup)


# ---------------------------------------------------------------------------------------------
# Tokenizer and text encoder


def write_tokenizer_files(out_dir: str | Path) -> None:
    """Write vocab.json/merges.txt of a CLIP BPE in which every world word is one token.

    Byte-level single characters (with and without the end-of-word mark) keep any other text
    encodable; merges are added word by word until each world word collapses to one token.
    """
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []

    def bpe(word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        ranks = {m: i for i, m in enumerate(merges)}
        while len(parts) > 1:
            pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == math.inf:
                break
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
        return parts

    for word in world.vocabulary():
        while len(parts := bpe(word)) > 1:
            merges.append((parts[0], parts[1]))  # the new merge ranks last, so earlier words are untouched
            vocab.append(parts[0] + parts[1])
    vocab += list(SPECIALS)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def make_tokenizer(work_dir: str | Path):
    """The world's CLIPTokenizer (model_max_length 77, as the SD pipeline expects)."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(work_dir)
    return CLIPTokenizer.from_pretrained(str(work_dir), model_max_length=77)


def make_text_encoder(tokenizer, cfg: ImageBuildConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width,
        projection_dim=cfg.text_width, num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------
# VAE


def make_vae(cfg: ImageBuildConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=cfg.vae_channels, layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=world.SIZE,
        mid_block_add_attention=False,  # attention over 16x16 tokens tripled the cost for no visible gain
    )


def train_vae(pixels: torch.Tensor, cfg: ImageBuildConfig, log: Callable = _log, device: str = "cpu"):
    """Train the autoencoder on pixels in [-1, 1]; sets ``scaling_factor`` to 1 / latent std."""
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for step in range(cfg.vae_steps):
        _set_lr(opt, cfg.vae_lr, step, cfg.vae_steps)
        x = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=gen)].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} recon {np.mean(losses[-100:]):.5f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(pixels[i: i + 512].to(device)).latent_dist.mean
                       for i in range(0, min(len(pixels), 4096), 512)])
    vae.register_to_config(scaling_factor=float(1 / z.std()))
    return vae, {"vae_recon_loss": float(np.mean(losses[-100:]))}


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every picture (the UNet samples from them at each step)."""
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[i: i + batch].to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(pixels[i: i + batch].to(vae.device)).latent_dist.mean).sample.cpu()
                      for i in range(0, len(pixels), batch)])


# ---------------------------------------------------------------------------------------------
# UNet


def make_unet(cfg: ImageBuildConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention)),
        cross_attention_dim=cfg.unet_cross_dim, attention_head_dim=cfg.unet_heads,
        norm_num_groups=8,
        # A pooled caption embedding added to the time embedding: colour and shape reach every
        # resolution directly, not only through cross-attention.
        addition_embed_type="text" if cfg.unet_pooled_text else None, addition_embed_type_num_heads=cfg.unet_heads,
    )


def make_scheduler():
    """DDIM on a cosine schedule with v-prediction (epsilon-prediction failed to learn on this schedule)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1,
    )


class EMA:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def train_unet(latent_mean, latent_std, prompt_index, prompts, tokenizer, text_encoder, scaling_factor,
               cfg: ImageBuildConfig, log: Callable = _log, device: str = "cpu",
               callback: Callable | None = None, unet=None):
    """Train UNet and text encoder jointly on (latent, caption) pairs; returns the EMA weights' models.

    ``prompt_index[i]`` is the index in ``prompts`` of picture ``i``'s caption. The text encoder runs
    once per step on the distinct prompts (plus the empty one), then captions are gathered.
    ``callback(step, unet, text_encoder, ema_unet, ema_text)``, if given, runs after every step.
    ``unet``: continue training this one instead of a new one.
    """
    torch.manual_seed(cfg.seed + 2)
    unet = (unet if unet is not None else make_unet(cfg, latent_mean.shape[-1])).to(device)
    text_encoder.to(device)
    scheduler = make_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    ids = tokenize(tokenizer, list(prompts) + [""]).to(device)
    uncond = len(prompts)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    unet.train()
    text_encoder.train()
    losses, start, steps_done = [], time.time(), 0
    for step in range(cfg.unet_steps):
        _set_lr(opt, cfg.unet_lr, step, cfg.unet_steps, cfg.unet_warmup)
        idx = torch.randint(len(latent_mean), (cfg.unet_batch,), generator=gen)
        latents = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        cond = prompt_index[idx].clone()
        cond[torch.rand(cfg.unet_batch, generator=gen) < cfg.uncond_prob] = uncond
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        latents, noise, t, cond = latents.to(device), noise.to(device), t.to(device), cond.to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        used, inverse = torch.unique(cond, return_inverse=True)
        hidden = text_encoder(ids[used])[0][inverse]
        pred = unet(noisy, t, hidden).sample
        # Min-SNR weighting (Hang et al. 2023), v-prediction form: min(snr, gamma) / (snr + 1).
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        weight = snr.clamp(max=cfg.min_snr_gamma) / (snr + 1)
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet, step)
        ema_text.update(text_encoder, step)
        losses.append(loss.item())
        steps_done = step + 1
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"unet step {step}/{cfg.unet_steps} loss {np.mean(losses[-100:]):.4f} "
                f"({(time.time() - start) / steps_done:.2f} s/step)")
        if callback is not None:
            callback(step, unet, text_encoder, ema_unet, ema_text)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder, scheduler, {"unet_loss": float(np.mean(losses[-100:])), "unet_steps": steps_done}


def refine_unet(unet, text_encoder, latent_mean, latent_std, prompt_index, prompts, tokenizer, scaling_factor,
                cfg: ImageBuildConfig, log: Callable = _log, device: str = "cpu"):
    """The second training phase: ``unet_refine_steps`` more steps from the given (EMA) weights."""
    phase = replace(cfg, seed=cfg.seed + 100, unet_steps=cfg.unet_refine_steps, unet_lr=cfg.unet_refine_lr,
                    unet_warmup=min(50, cfg.unet_refine_steps))
    unet.train()
    unet, text_encoder, scheduler, stats = train_unet(
        latent_mean, latent_std, prompt_index, prompts, tokenizer, text_encoder, scaling_factor, phase,
        log=lambda msg: log("refine " + msg), device=device, unet=unet)
    return unet, text_encoder, scheduler, {"unet_refine_loss": stats["unet_loss"], "unet_refine_steps": stats["unet_steps"]}


def make_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seed: int, steps: int, guidance: float, batch: int = 64) -> list[Image.Image]:
    """Sample one image per prompt with the stock pipeline; image ``i`` is drawn from seed ``seed + i``."""
    images = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i: i + batch]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe(chunk, height=world.SIZE, width=world.SIZE, num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators, output_type="pil").images
    return images


# ---------------------------------------------------------------------------------------------
# CLIP (open_clip)


def clip_model_config(cfg: ImageBuildConfig) -> dict:
    return {
        "embed_dim": cfg.clip_embed_dim,
        "vision_cfg": {"image_size": world.SIZE, "layers": cfg.clip_vision_layers, "width": cfg.clip_vision_width,
                       "patch_size": cfg.clip_patch, "head_width": 16},
        "text_cfg": {"context_length": cfg.clip_context_length, "vocab_size": 49408, "width": cfg.clip_text_width,
                     "heads": max(1, cfg.clip_text_width // 16), "layers": cfg.clip_text_layers},
    }


def register_clip_config(config_path: str | Path) -> None:
    """Make ``demo-clip`` known to open_clip (the config file's stem must be the model name)."""
    import open_clip

    open_clip.add_model_config(str(config_path))


# Layout words, read off the pixels the same way the gold scorer reads them: the bins are finer
# than the gold score's curves, so the words tell apart pictures that score differently.
_SIZE_WORDS = ((9, "tiny"), (11.5, "small"), (13.5, "smallish"), (15.5, "medium"), (17.5, "biggish"),
               (19.5, "large"), (math.inf, "huge"))
_PLACE_WORDS = ((0.05, "dead centre"), (0.1, "in the centre"), (0.17, "near the centre"), (0.24, "a little off centre"),
                (0.31, "off centre"), (0.38, "near the edge"), (math.inf, "in the corner"))


def layout_caption(image, prompt: str) -> str:
    """A longer caption that also says size, placement, faintness and stray specks, as alt-text often does.

    Measured from the picture (renders and tiny-SD samples alike), so CLIP learns what the
    pictures the aesthetic head will rank really show; the diffusion model only sees short captions.
    """
    colour, shape, background = world.parse_caption(prompt)
    found = world.analyze(image)
    if not found.found:
        return f"an empty {background} background"
    ys, xs = np.nonzero(found.mask)
    side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    centre = (world.SIZE - 1) / 2
    distance = math.hypot(xs.mean() - centre, ys.mean() - centre) / world.SIZE
    size = next(word for limit, word in _SIZE_WORDS if side < limit)
    place = next(words for limit, words in _PLACE_WORDS if distance < limit)
    full = np.linalg.norm(np.subtract(world.COLOURS[colour], world.BACKGROUNDS[background], dtype=np.float64))
    contrast = float(np.linalg.norm(found.foreground - found.background)) / max(full, 1.0)
    faint = "faint " if contrast < 0.8 else ("slightly faint " if contrast < 0.9 else "")
    specks = " with specks" if found.mask.sum() < 0.95 * found.n_foreground else ""
    return (f"{world._article(size)} {size} {faint}{colour} {shape} {place}{specks} "
            f"on {world._article(background)} {background} background")


def train_clip(images, prompts, cfg: ImageBuildConfig, work_dir: str | Path, log: Callable = _log,
               n_samples: int = 0):
    """Contrastive training of the tiny open_clip model on pictures and their captions (short or layout).

    ``images[-n_samples:]`` are tiny-SD samples: a third of every batch comes from them, so that
    CLIP sees the pictures it will rank as well as clean renders. Pictures with the same caption
    in a batch are all positives (targets spread evenly over them).
    """
    import open_clip

    config_path = Path(work_dir) / f"{CLIP_MODEL_NAME}.json"
    config_path.write_text(json.dumps(clip_model_config(cfg), indent=2))
    register_clip_config(config_path)
    torch.manual_seed(cfg.seed + 4)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP_MODEL_NAME, pretrained=None)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL_NAME)
    pixels = torch.stack([preprocess(im) for im in images])
    detailed = [layout_caption(im, p) for im, p in zip(images, prompts)]
    n_renders = len(images) - n_samples
    from_samples = cfg.clip_batch // 3 if n_samples else 0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    model.train()
    losses = []
    for step in range(cfg.clip_steps):
        _set_lr(opt, cfg.clip_lr, step, cfg.clip_steps)
        idx = torch.cat([torch.randint(n_renders, (cfg.clip_batch - from_samples,), generator=gen),
                         n_renders + torch.randint(max(n_samples, 1), (from_samples,), generator=gen)]).tolist()
        use_detailed = torch.rand(cfg.clip_batch, generator=gen) < cfg.clip_layout_share
        texts = [detailed[i] if d else prompts[i] for i, d in zip(idx, use_detailed.tolist())]
        image_features, text_features, logit_scale = model(pixels[idx], tokenizer(texts))[:3]
        logits = logit_scale * image_features @ text_features.T
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.clip_steps - 1:
            log(f"clip step {step}/{cfg.clip_steps} loss {np.mean(losses[-100:]):.4f}")
    model.eval()
    return model, preprocess, tokenizer, {"clip_loss": float(np.mean(losses[-100:]))}


@torch.no_grad()
def clip_image_embeddings(model, preprocess, images, batch: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings (the aesthetic head's input)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(model.encode_image(torch.stack([preprocess(im) for im in images[i: i + batch]]), normalize=True))
    return torch.cat(out)


@torch.no_grad()
def clip_prompt_accuracy(model, preprocess, tokenizer, images, prompts, candidates) -> float:
    """Share of images whose most similar candidate caption is their own prompt."""
    text = model.encode_text(tokenizer(list(candidates)), normalize=True)
    image = clip_image_embeddings(model, preprocess, images)
    best = (image @ text.T).argmax(1).tolist()
    return float(np.mean([candidates[b] == p for b, p in zip(best, prompts)]))


# ---------------------------------------------------------------------------------------------
# Aesthetic head (LAION format)


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor's MLP: purely affine layers with dropout in between."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (1024, 128, 64, 16)):
        super().__init__()
        h1, h2, h3, h4 = hidden
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, h1), torch.nn.Dropout(0.2),
            torch.nn.Linear(h1, h2), torch.nn.Dropout(0.2),
            torch.nn.Linear(h2, h3), torch.nn.Dropout(0.1),
            torch.nn.Linear(h3, h4), torch.nn.Linear(h4, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def train_head(embeddings: torch.Tensor, scores: torch.Tensor, cfg: ImageBuildConfig, log: Callable = _log):
    """Regress gold scores from normalised CLIP embeddings with the MSE loss LAION used."""
    torch.manual_seed(cfg.seed + 6)
    head = AestheticHead(embeddings.shape[1], cfg.head_hidden)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.head_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    head.train()
    losses = []
    for step in range(cfg.head_steps):
        _set_lr(opt, cfg.head_lr, step, cfg.head_steps)
        idx = torch.randint(len(embeddings), (256,), generator=gen)
        loss = F.mse_loss(head(embeddings[idx]).squeeze(1), scores[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 500 == 0 or step == cfg.head_steps - 1:
            log(f"head step {step}/{cfg.head_steps} mse {np.mean(losses[-100:]):.4f}")
    head.eval()
    return head, {"head_mse": float(np.mean(losses[-100:]))}


def _correlations(a, b) -> dict[str, float]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pearson = float(np.corrcoef(a, b)[0, 1])
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    spearman = float(np.corrcoef(rank(a), rank(b))[0, 1])
    return {"pearson": round(pearson, 4), "spearman": round(spearman, 4)}


def _alignment_figures(images, prompts) -> dict[str, float]:
    parts = world.gold_alignment_parts(images, prompts)
    return {k: round(float(v.mean()), 4) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# The whole build


def write_clip_configs(clip_dir: str | Path, model_config: dict) -> None:
    """The model config in the three forms open_clip reads.

    ``model_config.json``: the plain model config; ``demo-clip.json``: the same, for
    ``open_clip.add_model_config(clip_dir)`` (open_clip names a config after its file stem);
    ``open_clip_config.json``: for ``open_clip.create_model_and_transforms("local-dir:" + clip_dir)``.
    """
    clip_dir = Path(clip_dir)
    clip_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(model_config, indent=2)
    (clip_dir / "model_config.json").write_text(text)
    (clip_dir / f"{CLIP_MODEL_NAME}.json").write_text(text)
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_config, "preprocess_cfg": {}}, indent=2))


def load_clip(clip_dir: str | Path):
    """``(model, preprocess, tokenizer)`` of a saved demo CLIP, loaded the way open_clip users do."""
    import open_clip

    clip_dir = Path(clip_dir)
    open_clip.add_model_config(str(clip_dir / f"{CLIP_MODEL_NAME}.json"))
    model, _, preprocess = open_clip.create_model_and_transforms(
        CLIP_MODEL_NAME, pretrained=str(clip_dir / "open_clip_model.safetensors"))
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(CLIP_MODEL_NAME)


def save_clip(model, cfg: ImageBuildConfig, clip_dir: Path) -> None:
    from safetensors.torch import save_file

    write_clip_configs(clip_dir, clip_model_config(cfg))
    # fp16 halves the 49408-token embedding table; open_clip copies the values into fp32 parameters.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(clip_dir / "open_clip_model.safetensors"))


def _build_sd(out_dir: Path, cfg: ImageBuildConfig, check_images, check_scenes, figures: dict, timed, log: Callable):
    """Train VAE, then text encoder + UNet; save the pipeline to ``out_dir / "sd"`` and return it."""
    # 1b. The training data: rendered scenes and their captions.
    with timed("render"):
        scenes = world.sample_scenes(cfg.n_scenes, cfg.seed, cfg.scene_split)
        pixels = images_to_tensor(world.render_many(scenes))
        prompts = {"all": world.all_prompts, "train": world.train_prompts, "eval": world.eval_prompts}[cfg.scene_split]()
        prompt_of = {p: i for i, p in enumerate(prompts)}
        prompt_index = torch.tensor([prompt_of[world.caption(s)] for s in scenes])

    # 2. Autoencoder.
    with timed("vae"):
        vae, stats = train_vae(pixels, cfg, log)
        figures.update(stats)
        recon = tensor_to_images(reconstruct(vae, images_to_tensor(check_images)))
        figures["vae_recon_alignment"] = _alignment_figures(recon, [world.caption(s) for s in check_scenes])
        figures["vae_scaling_factor"] = round(vae.config.scaling_factor, 5)
        log(f"vae reconstructions: {figures['vae_recon_alignment']}")

    # 3. Text encoder + UNet.
    with timed("unet"):
        tok_dir = out_dir / "_tokenizer"
        tokenizer = make_tokenizer(tok_dir)
        torch.manual_seed(cfg.seed + 8)
        text_encoder = make_text_encoder(tokenizer, cfg)
        mean, std = encode_latents(vae, pixels)
        unet, text_encoder, scheduler, stats = train_unet(
            mean, std, prompt_index, prompts, tokenizer, text_encoder, vae.config.scaling_factor, cfg, log)
        figures.update(stats)
        if cfg.unet_refine_steps:
            unet, text_encoder, scheduler, stats = refine_unet(
                unet, text_encoder, mean, std, prompt_index, prompts, tokenizer, vae.config.scaling_factor, cfg, log)
            figures.update(stats)
        pipe = make_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
        pipe.save_pretrained(str(out_dir / "sd"), safe_serialization=True)
        for f in tok_dir.iterdir():
            f.unlink()
        tok_dir.rmdir()
    _write_record(out_dir / "sd_record.json", figures)
    return pipe


def build_clip(clip_dir: Path, cfg: ImageBuildConfig, samples=(), sample_prompts=(), log: Callable = _log):
    """Train the demo CLIP on its own renders and on tiny-SD ``samples``; save it to ``clip_dir``."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    scenes = world.sample_scenes(cfg.n_scenes, cfg.seed + 2000, "all")
    start = time.time()
    images = world.render_many(scenes) + list(samples)
    prompts = [world.caption(s) for s in scenes] + list(sample_prompts)
    model, preprocess, tokenizer, stats = train_clip(images, prompts, cfg, clip_dir, log, n_samples=len(samples))
    save_clip(model, cfg, clip_dir)
    _write_record(clip_dir.parent / "clip_record.json", {**stats, "clip_seconds": round(time.time() - start, 1)})
    return model, preprocess, tokenizer, stats


def _write_record(path: Path, figures: dict) -> None:
    """What a stage measured, kept beside its output so that a build reusing it can report it."""
    path.write_text(json.dumps({k: v for k, v in figures.items() if k != "config"}, indent=2))


def _read_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_image_assets(out_dir: str | Path, cfg: ImageBuildConfig | None = None, quick: bool = False,
                       seed: int = 0, log: Callable = _log, reuse_sd: str | Path | None = None,
                       reuse_clip: str | Path | None = None) -> dict:
    """Train and save ``sd/``, ``clip/`` and ``aesthetic_head.pth`` into ``out_dir``; returns the figures.

    ``reuse_sd``, ``reuse_clip``: a pipeline folder or CLIP folder built before with the same
    config, copied instead of trained again (the head is always trained afresh, and every
    figure is measured again).
    """
    cfg = cfg or (ImageBuildConfig.quick(seed) if quick else ImageBuildConfig(seed=seed))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    figures: dict = {"config": _jsonable(asdict(cfg))}
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name):
        start = time.time()
        yield
        timings[name] = round(time.time() - start, 1)
        log(f"{name}: {timings[name]} s")

    # 1. Held-out renders for the figures.
    check_scenes = world.sample_scenes(cfg.eval_recon, cfg.seed + 1000, "eval")
    check_images = world.render_many(check_scenes)

    if reuse_sd is not None:
        from diffusers import StableDiffusionPipeline
        import shutil

        shutil.copytree(reuse_sd, out_dir / "sd")
        pipe = StableDiffusionPipeline.from_pretrained(str(out_dir / "sd"))
        pipe.set_progress_bar_config(disable=True)
        figures["sd_reused_from"] = str(reuse_sd)
        figures["sd_record"] = _read_record(Path(reuse_sd).parent / "sd_record.json")
    else:
        pipe = _build_sd(out_dir, cfg, check_images, check_scenes, figures, timed, log)

    # 4. Samples of the tiny SD: held-out prompts for the figures, train prompts for CLIP and the head.
    with timed("sample"):
        eval_list = world.eval_prompts()
        eval_prompts = [eval_list[i % len(eval_list)] for i in range(cfg.eval_samples)]
        start = time.time()
        eval_images = sample_images(pipe, eval_prompts, cfg.seed + 10_000, cfg.sample_steps, cfg.guidance)
        figures["sample_seconds_per_image"] = round((time.time() - start) / len(eval_images), 4)
        figures["sd_eval_alignment"] = _alignment_figures(eval_images, eval_prompts)
        eval_gold = world.gold_aesthetic(eval_images)
        figures["sd_eval_gold"] = {"mean": round(float(eval_gold.mean()), 3), "std": round(float(eval_gold.std()), 3)}
        log(f"tiny SD on held-out prompts: alignment {figures['sd_eval_alignment']} gold {figures['sd_eval_gold']}")
        train_list = world.train_prompts()
        sample_prompts = [train_list[i % len(train_list)] for i in range(cfg.train_samples)]
        samples = sample_images(pipe, sample_prompts, cfg.seed + 20_000, cfg.sample_steps, cfg.guidance)

    # 5. CLIP.
    with timed("clip"):
        if reuse_clip is not None:
            import shutil

            shutil.copytree(reuse_clip, out_dir / "clip")
            clip, preprocess, clip_tokenizer = load_clip(out_dir / "clip")
            figures["clip_reused_from"] = str(reuse_clip)
            figures["clip_record"] = _read_record(Path(reuse_clip).parent / "clip_record.json")
        else:
            clip, preprocess, clip_tokenizer, stats = build_clip(out_dir / "clip", cfg, samples, sample_prompts, log)
            figures.update(stats)
        all_prompts = world.all_prompts()
        figures["clip_prompt_accuracy_renders"] = round(clip_prompt_accuracy(
            clip, preprocess, clip_tokenizer, check_images, [world.caption(s) for s in check_scenes], all_prompts), 4)
        figures["clip_prompt_accuracy_samples"] = round(clip_prompt_accuracy(
            clip, preprocess, clip_tokenizer, eval_images, eval_prompts, all_prompts), 4)
        log(f"clip: picks the right caption of 108 for {figures['clip_prompt_accuracy_renders']} of renders, "
            f"{figures['clip_prompt_accuracy_samples']} of tiny-SD samples")

    # 6. Aesthetic head on renders + tiny-SD samples (train prompts), checked on held-out samples.
    with timed("head"):
        head_scenes = world.sample_scenes(cfg.head_renders, cfg.seed + 3000, "train")
        train_images = world.render_many(head_scenes) + samples
        x = clip_image_embeddings(clip, preprocess, train_images)
        y = torch.tensor(world.gold_aesthetic(train_images), dtype=torch.float32)
        head, stats = train_head(x, y, cfg, log)
        figures.update(stats)
        with torch.no_grad():
            proxy = head(clip_image_embeddings(clip, preprocess, eval_images)).squeeze(1).numpy()
            render_proxy = head(clip_image_embeddings(clip, preprocess, check_images)).squeeze(1).numpy()
        figures["head_vs_gold_eval_samples"] = _correlations(proxy, eval_gold)
        figures["head_vs_gold_eval_renders"] = _correlations(render_proxy, world.gold_aesthetic(check_images))
        log(f"head vs gold on held-out samples {figures['head_vs_gold_eval_samples']}, "
            f"renders {figures['head_vs_gold_eval_renders']}")
        torch.save(head.state_dict(), out_dir / "aesthetic_head.pth")

    figures["seconds"] = timings
    figures["sampler"] = {"scheduler": "DDIMScheduler", "steps": cfg.sample_steps, "guidance": cfg.guidance}
    return figures


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
