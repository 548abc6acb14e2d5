"""A tiny Stable Diffusion pipeline built from config, for tests that need a real diffusers pipeline.

``build_tiny_sd(path)`` writes a complete ``StableDiffusionPipeline`` folder (UNet, VAE, CLIP text
encoder, CLIP tokenizer, DDIM scheduler) with random weights in about a second, in the same format
as a downloaded SD-1.5 folder. Latents are 4x8x8 and images 16x16 (the two-block VAE downsamples by 2).

    @pytest.fixture(scope="session")
    def tiny_sd(tmp_path_factory):
        return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
"""

from __future__ import annotations

from pathlib import Path

import torch

from raft_diffusion.demo.random_sd import write_char_clip_tokenizer


def build_tiny_sd(
    path: str | Path, seed: int = 0, sample_size: int = 8, prediction_type: str = "epsilon", norm_num_groups: int = 8
) -> Path:
    """Write a tiny random-weight StableDiffusionPipeline folder at ``path`` and return ``path``.

    UNet: block_out_channels (32, 64), one cross-attention block down and one up, cross_attention_dim
    32, latents ``4 x sample_size x sample_size``; VAE: two blocks (scale factor 2); text encoder:
    2-layer CLIP with hidden size 32. Deterministic for a given ``seed``.

    ``prediction_type``: epsilon (SD-1.x) or v_prediction (SD-2.x). With random weights, epsilon
    samples come out about 8x too large and barely respond to fine-tuning; v-prediction samples
    have a sane scale (x0 ~ -v at high noise) and a few RAFT stages move them: use it where a test
    needs fine-tuning to change what the model draws. ``norm_num_groups`` 8 (4 channels per group,
    not 1) leaves per-channel means through the GroupNorms, so that image brightness varies from
    sample to sample and a LoRA can shift it.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Through from_pretrained: transformers 5 ignores vocab_file/merges_file keyword arguments.
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=norm_num_groups,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,  # coarser groups than 32: decoded brightness then varies from sample to sample
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
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
    pipe.save_pretrained(path)
    return path
