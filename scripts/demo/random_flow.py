"""Random-weight SD3 and FLUX.1 pipeline folders built offline, in the format the hub's have: tiny ones
for the tests (the sizes of diffusers' own pipeline tests) and full-sized ones (SD3.5 Medium,
FLUX.1-dev) for memory and speed figures. Random weights time and weigh exactly like real ones.

Text encoders come from configs (CLIP from ``CLIPTextConfig``, T5 from ``T5Config``); the CLIP
tokenizers are character-level, and the T5 tokenizer is a ``tokenizers`` Unigram model wrapped in
``T5TokenizerFast`` (transformers 5 rebuilds T5 tokenizers from a Unigram vocabulary). Tiny latents
are 4x8x8 (SD3) and 4x8x8 unpacked into 16 tokens of 16 (FLUX), images 16x16.

    python scripts/demo/random_flow.py sd35_medium /tmp/sd35m   # about 16 GB in bfloat16
"""

from __future__ import annotations

import string
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from a checkout

from scripts.demo.random_sd import write_char_clip_tokenizer  # noqa: E402

# Tiny sizes, and the published configs of the real models' components.
TINY = {"t5": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
        "clip": dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)}
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, relative_attention_num_buckets=32,
              feed_forward_proj="gated-gelu")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu")
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                   joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
VAE_16 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32)


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


def _t5(vocab_size: int, size: dict):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, decoder_start_token_id=0, **size))


def _clip(tokenizer, size: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=size["hidden_size"],
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, **size)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(size: dict | None, shift: float = 0.0609, scale: float = 1.5035):
    from diffusers import AutoencoderKL

    size = size or dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8)
    blocks = len(size["block_out_channels"])
    return AutoencoderKL(sample_size=16, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=shift, scaling_factor=scale, **size)


class _default_dtype:
    """Build the full-sized models directly in bfloat16: in float32 first they would need twice the memory."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


def build_sd3(path: str | Path, seed: int = 0, preset: str = "tiny") -> Path:
    """A ``StableDiffusion3Pipeline`` folder with two CLIP encoders and a T5, shift 3: ``tiny`` (an MMDiT of 2
    joint blocks) or ``sd35_medium`` (SD3.5 Medium's sizes, bfloat16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tiny = preset == "tiny"
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)
    tokenizer_3 = _t5_tokenizer(path / "tokenizer_3")
    with _default_dtype(torch.float32 if tiny else torch.bfloat16):
        if tiny:
            transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                                pooled_projection_dim=32, out_channels=4)
            clip_1 = clip_2 = {**TINY["clip"], "hidden_size": 16}
        else:
            transformer, clip_1, clip_2 = SD3Transformer2DModel(**SD35_MEDIUM), CLIP_L, CLIP_G
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(None if tiny else VAE_16, 0.0609, 1.5035 if tiny else 1.5305),
            text_encoder=_clip(tokenizer, clip_1, True), tokenizer=tokenizer,
            text_encoder_2=_clip(tokenizer, clip_2, True), tokenizer_2=tokenizer,
            text_encoder_3=_t5(len(tokenizer_3), TINY["t5"] if tiny else T5_XXL), tokenizer_3=tokenizer_3,
        )
    pipe.save_pretrained(path)
    return path


def build_flux(path: str | Path, seed: int = 0, preset: str = "tiny", guidance_embeds: bool = True) -> Path:
    """A ``FluxPipeline`` folder (dev with ``guidance_embeds``, else schnell-like) with a CLIP and a T5 encoder,
    dynamic shift: ``tiny`` (one double and one single block) or ``flux_dev`` (FLUX.1-dev's sizes, bfloat16)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    tiny = preset == "tiny"
    tokenizer = CLIPTokenizer.from_pretrained(write_char_clip_tokenizer(path / "tokenizer"), model_max_length=77)
    tokenizer_2 = _t5_tokenizer(path / "tokenizer_2")
    with _default_dtype(torch.float32 if tiny else torch.bfloat16):
        if tiny:
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                                 pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
            clip = {**TINY["clip"], "hidden_size": 32}
        else:
            transformer, clip = FluxTransformer2DModel(**{**FLUX_DEV, "guidance_embeds": guidance_embeds}), CLIP_L
        scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
                                                    base_shift=0.5, max_shift=1.15)
        pipe = FluxPipeline(transformer=transformer, scheduler=scheduler,
                            vae=_vae(None if tiny else VAE_16, 0.0609 if tiny else 0.1159, 1.5035 if tiny else 0.3611),
                            text_encoder=_clip(tokenizer, clip, False), tokenizer=tokenizer,
                            text_encoder_2=_t5(len(tokenizer_2), TINY["t5"] if tiny else T5_XXL), tokenizer_2=tokenizer_2)
    pipe.save_pretrained(path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=["tiny_sd3", "tiny_flux", "sd35_medium", "flux_dev"])
    parser.add_argument("out")
    args = parser.parse_args()
    if args.preset in ("tiny_sd3", "sd35_medium"):
        build_sd3(args.out, preset="tiny" if args.preset == "tiny_sd3" else args.preset)
    else:
        build_flux(args.out, preset="tiny" if args.preset == "tiny_flux" else args.preset)
    print(args.out)
