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

from scripts.demo.random_sd import build_random_sd


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
    return build_random_sd(path, "tiny", seed, sample_size, prediction_type=prediction_type, norm_num_groups=norm_num_groups)


def load_lora_collecting_messages(pipe, path) -> list[str]:
    """``pipe.load_lora_weights(path)``, returning every diffusers log message and warning it raised."""
    import logging
    import warnings

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # The file named: before 0.40, diffusers finds it in a local folder only when online (the suite is offline).
            pipe.load_lora_weights(str(path), weight_name="pytorch_lora_weights.safetensors")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    return messages + [str(w.message) for w in caught]
