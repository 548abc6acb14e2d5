"""Stable Diffusion pipelines with random weights, built from config: for tests and benchmarks.

``build_random_sd(path, preset="tiny")`` writes a complete ``StableDiffusionPipeline`` folder
(UNet, VAE, CLIP text encoder, CLIP tokenizer, DDIM scheduler) in the format of a downloaded
SD-1.5 folder. ``preset="sd15"`` has SD-1.5's exact architecture (860M-parameter UNet), so it
times like the real model; ``"tiny"`` builds in about a second (latents 4x8x8, images 16x16).
``"tiny_xl"`` writes a ``StableDiffusionXLPipeline`` folder just as small: two CLIP text encoders
(``CLIPTextModel`` + ``CLIPTextModelWithProjection``), two tokenizers, a UNet conditioned on the
pooled text embedding and the size/crop ids (``addition_embed_type="text_time"``), SDXL's
scheduler and VAE settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character table: the alphabet byte-level BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


def write_char_clip_tokenizer(path: str | Path) -> Path:
    """A character-level CLIP tokenizer (514 tokens, no merges): every text tokenizes, one token per byte."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return path


PRESETS = {
    "tiny": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        vocab_size=None,  # the tokenizer's own size
    ),
    # SD-1.5's architecture (runwayml/stable-diffusion-v1-5 configs).
    "sd15": dict(
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"),
        vocab_size=49408,
    ),
    # SDXL's conditioning in miniature (as diffusers' own SDXL tests build it): the UNet attends to
    # both encoders' hidden states side by side (32 + 32) and adds the pooled embedding of encoder 2
    # and six size/crop ids, each embedded in addition_time_embed_dim features. Attention on the
    # first level and coarse GroupNorm groups (unlike SDXL) let a LoRA move the random model.
    "tiny_xl": dict(
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
            norm_num_groups=8,
        ),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, scaling_factor=0.13025),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        text_2=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        vocab_size=None,
    ),
}

# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json (from_config keeps the keys other
# samplers read, e.g. clip_sample=False for DDIM).
SDXL_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}


def build_random_sd(
    path: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    sample_size: int = 8,
    device: str = "cpu",
    prediction_type: str = "epsilon",
    norm_num_groups: int | None = None,
) -> Path:
    """Write a random-weight StableDiffusionPipeline (``tiny_xl``: StableDiffusionXLPipeline) folder at
    ``path`` and return ``path``.

    ``sample_size`` is the UNet's default latent side (the default image side is twice that for
    ``tiny``, whose two-block VAE downsamples by 2, and 8 times that for ``sd15``).
    Deterministic for a given ``seed``. ``device`` only speeds up initialising large presets.
    ``prediction_type`` (epsilon or v_prediction) goes to the scheduler; ``norm_num_groups``
    overrides the preset's GroupNorm groups of the UNet and the VAE.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = PRESETS[preset]
    if norm_num_groups is not None:
        spec = {**spec, "unet": {**spec["unet"], "norm_num_groups": norm_num_groups}, "vae": {**spec["vae"], "norm_num_groups": norm_num_groups}}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Through from_pretrained: transformers 5 ignores vocab_file/merges_file keyword arguments.
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)
    n_vae_blocks = len(spec["vae"]["block_out_channels"])

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, **spec["unet"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n_vae_blocks,
            up_block_types=("UpDecoderBlock2D",) * n_vae_blocks,
            latent_channels=4,
            sample_size=sample_size * 2 ** (n_vae_blocks - 1),
            **spec["vae"],
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=spec["vocab_size"] or len(tokenizer),
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **spec["text"],
            )
        )
    if "text_2" in spec:
        return _save_xl(path, spec, unet, vae, text_encoder, tokenizer, device)
    # SD-1.5's scheduler settings (scaled_linear betas, steps_offset 1, set_alpha_to_one False).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if preset != "tiny":
        pipe.to(dtype=torch.float16)  # halves the folder; loaders cast to the run's dtype
    pipe.save_pretrained(path)
    return path


def _save_xl(path: Path, spec: dict, unet, vae, text_encoder, tokenizer, device: str) -> Path:
    """The SDXL branch of :func:`build_random_sd`: adds encoder 2 and its tokenizer, saves the folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    # SDXL's tokenizer_2 pads with "!" where tokenizer 1 pads with <|endoftext|>.
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        write_char_clip_tokenizer(path / "tokenizer_2"), model_max_length=77, pad_token="!"
    )
    with torch.device(device):
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=spec["vocab_size"] or len(tokenizer_2),
                max_position_embeddings=77,
                bos_token_id=tokenizer_2.bos_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                pad_token_id=tokenizer_2.pad_token_id,
                **spec["text_2"],
            )
        )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path
