"""Library warnings known to be harmless are hidden, by exact message; others still show."""

from __future__ import annotations

import logging
import warnings

from tests.sd_fixtures import build_tiny_sd


def test_unet_only_lora_loads_without_the_no_text_encoder_keys_message(tmp_path):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.adapters.diffusion import load_lora
    from tests.test_diffusion_adapter import make_adapter

    model = str(build_tiny_sd(tmp_path / "sd"))
    make_adapter(model).export(tmp_path / "lora")  # a UNet LoRA: no text-encoder keys
    pipe = StableDiffusionPipeline.from_pretrained(model)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("diffusers").addHandler(handler)
    try:
        assert load_lora(pipe, str(tmp_path / "lora")) is False
        logging.getLogger("diffusers.loaders.lora_base").warning("No LoRA keys: a message outside load_lora")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert messages == ["No LoRA keys: a message outside load_lora"]


def test_is_gradient_checkpointing_future_warning_is_hidden_and_no_other():
    from transformers import GPT2Config, GPT2LMHeadModel

    from raft_diffusion.cli import silence_known_warnings

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        assert model.is_gradient_checkpointing is False  # as peft reads it when it wraps a model
        warnings.warn("`gradient_checkpointing_enable` is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["`gradient_checkpointing_enable` is deprecated"]


def test_sampling_equal_length_prompts_gives_no_attention_mask_warning(tmp_path):
    """transformers drops an all-ones mask and warns at any pad token fed back in: finished rows get EOS."""
    from tests.lm_fixtures import build_tiny_lm
    from tests.test_llm_adapter import make_adapter, make_config

    adapter = make_adapter(make_config(build_tiny_lm(tmp_path / "lm"), sampling={"batch_size": 16}, llm={"max_new_tokens": 12}))
    logging.Logger.warning_once.cache_clear()  # a warning shown earlier in this process would not show again
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        candidates = adapter.generate(["the movie was"], 16, list(range(16)))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    lengths = [len(c.payload["response_ids"]) for c in candidates]
    assert min(lengths) < 12 <= max(lengths)  # rows that finished early went on being filled while others ran
    assert not [m for m in messages if "attention_mask" in m]
