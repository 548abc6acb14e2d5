"""Tiny random-weight SD3 and FLUX.1 pipeline folders built offline, in the format the hub's have.

Sizes follow diffusers' own pipeline tests. Text encoders come from configs (CLIP from
``CLIPTextConfig``, T5 from ``T5Config``); the CLIP tokenizers are character-level, and the T5
tokenizer is a ``tokenizers`` Unigram model wrapped in ``T5TokenizerFast`` (transformers 5 rebuilds T5
tokenizers from a Unigram vocabulary). Latents are 4x8x8 (SD3) and 4x8x8 unpacked / 16 tokens of 16
(FLUX), images 16x16.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

from raft_diffusion.demo.random_sd import write_char_clip_tokenizer

T5_WIDTH = 32


def _t5_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import T5TokenizerFast

    # Unigram over single characters: every lower-case text tokenizes; ids 0-2 are pad, eos, unk.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_lowercase + string.digits + ",.'"]
    pieces += [(f"▁{c}", -1.5) for c in string.ascii_lowercase]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(path)
    return T5TokenizerFast.from_pretrained(path)


def _t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0))


def _clip(tokenizer, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=projection or hidden,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, latent_channels=latent_channels, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A ``StableDiffusion3Pipeline`` folder: MMDiT of 2 joint blocks, two CLIP encoders, a T5, shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)
    tokenizer_3 = _t5_tokenizer(path / "tokenizer_3")
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
                                        pooled_projection_dim=32, out_channels=4)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(4),
        text_encoder=_clip(tokenizer, 16, 16), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, 16, 16), tokenizer_2=tokenizer,
        text_encoder_3=_t5(len(tokenizer_3)), tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A ``FluxPipeline`` folder (dev with ``guidance_embeds``, else schnell-like): one double and one
    single block, a CLIP and a T5 encoder, dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)
    tokenizer_2 = _t5_tokenizer(path / "tokenizer_2")
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=32,
                                         axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                                base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(4),
                        text_encoder=_clip(tokenizer, 32, None), tokenizer=tokenizer,
                        text_encoder_2=_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2)
    pipe.save_pretrained(path)
    return path
