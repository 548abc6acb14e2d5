"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules, without the ``image-reward`` package.

The package (1.5) pins timm 0.6.13 and fairscale 0.4.13; its model is BLIP's ViT image encoder, BLIP's
BERT text encoder with cross-attention to the image (``med.py``), and an MLP head on the text
encoder's first token. transformers' ``BlipVisionModel`` and ``BlipTextModel`` are ports of those two
BLIP modules, so the released checkpoint (``THUDM/ImageReward``: ``ImageReward.pt`` and
``med_config.json``) loads into them after renaming the image encoder's keys:

============================================  ==============================================
ImageReward.pt                                here
============================================  ==============================================
blip.visual_encoder.cls_token                 vision.embeddings.class_embedding
blip.visual_encoder.pos_embed                 vision.embeddings.position_embedding
blip.visual_encoder.patch_embed.proj.*        vision.embeddings.patch_embedding.*
blip.visual_encoder.blocks.N.norm1.*          vision.encoder.layers.N.layer_norm1.*
blip.visual_encoder.blocks.N.attn.qkv.*       vision.encoder.layers.N.self_attn.qkv.*
blip.visual_encoder.blocks.N.attn.proj.*      vision.encoder.layers.N.self_attn.projection.*
blip.visual_encoder.blocks.N.norm2.*          vision.encoder.layers.N.layer_norm2.*
blip.visual_encoder.blocks.N.mlp.fc1/fc2.*    vision.encoder.layers.N.mlp.fc1/fc2.*
blip.visual_encoder.norm.*                    vision.post_layernorm.*
blip.text_encoder.X                           text.X (the same names; position_ids dropped)
mlp.layers.{0,2,4,6,7}.*                      head.layers.{0,2,4,6,7}.*
============================================  ==============================================

The package's other keys (BLIP's pretraining projections, if present) are not used by its score and
are ignored, as its own ``load_state_dict(strict=False)`` ignores them. The score is computed as the
package's ``ImageReward.score`` does: the prompt tokenised by BERT's uncased tokenizer with BLIP's
two added tokens, padded and truncated to 35 tokens; the image resized (bicubic, shorter side) and
centre-cropped to 224 px as a PIL image, then the OpenAI CLIP normalisation; the head's output
normalised as ``(r - 0.16717362830052426) / 1.0333394966054072``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn

from aesthetic.loading import ClipConfigError
from aesthetic.predictor import AestheticHead
from raft_diffusion.rewards.preference import (
    OPENAI_MEAN, OPENAI_STD, ModelReward, hub_file, hub_pretrained, load_all, load_state_dict_file,
)

REPO = "THUDM/ImageReward"
CHECKPOINT, MED_CONFIG = "ImageReward.pt", "med_config.json"
TOKENIZER = "google-bert/bert-base-uncased"  # BLIP's 'bert-base-uncased'
MAX_TOKENS = 35
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
HEAD_LINEARS = (0, 2, 4, 6, 7)

_VISION_RENAMES = [  # (pattern of an ImageReward key, replacement), see the table above
    (r"^blip\.visual_encoder\.cls_token$", "vision.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "vision.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision.encoder.layers.\1.layer_norm1."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision.encoder.layers.\1.self_attn.qkv."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision.encoder.layers.\1.self_attn.projection."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision.encoder.layers.\1.layer_norm2."),
    (r"^blip\.visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision.encoder.layers.\1.mlp."),
    (r"^blip\.visual_encoder\.norm\.", "vision.post_layernorm."),
    (r"^blip\.text_encoder\.", "text."),
    (r"^mlp\.layers\.", "head.layers."),
]


def convert_checkpoint(state_dict: dict) -> dict:
    """ImageReward.pt's keys renamed for :class:`ImageRewardModel`; keys its score does not use are dropped."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _VISION_RENAMES:
            new, n = re.subn(pattern, replacement, key)
            if n:
                if not new.endswith("embeddings.position_ids"):
                    out[new] = value
                break
    return out


class ImageRewardModel(nn.Module):
    """BLIP image encoder -> BLIP text encoder cross-attending to it -> MLP on the first token."""

    def __init__(self, vision_config, text_config, head_widths: tuple[int, ...]):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(head_widths)  # the same Linear/Dropout layout and key names

    def forward(self, pixel_values, input_ids, attention_mask) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask)
        first = text.last_hidden_state[:, 0, :].float()  # the head runs in fp32, as the package's does
        return (self.head(first).reshape(-1) - REWARD_MEAN) / REWARD_STD


def configs_from_checkpoint(state: dict, med_config: dict, vision_heads: int | None = None):
    """The BLIP vision and text configs the (renamed) checkpoint and BLIP's med config describe.

    ImageReward's ViT (BLIP ``vit='large'``) is read from the weights: width, depth, patch and image
    size; attention heads are not in the weights (64 channels each in BLIP's ViTs)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    try:
        width = int(state["vision.embeddings.class_embedding"].shape[-1])
        patch = int(state["vision.embeddings.patch_embedding.weight"].shape[-1])
        positions = int(state["vision.embeddings.position_embedding"].shape[1])
        depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("vision.encoder.layers."))
        mlp = int(state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0])
        widths = [int(state[f"head.layers.{i}.weight"].shape[1]) for i in HEAD_LINEARS]
    except (KeyError, ValueError, IndexError) as err:
        raise ClipConfigError(f"image_reward: not an ImageReward checkpoint (missing {err})") from None
    grid = math.isqrt(positions - 1)
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
        num_attention_heads=int(vision_heads or width // 64), image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # BLIP's ViT: nn.GELU, LayerNorm(eps=1e-6)
    )
    m = med_config
    text = BlipTextConfig(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], encoder_hidden_size=width,
        intermediate_size=m["intermediate_size"], num_hidden_layers=m["num_hidden_layers"],
        num_attention_heads=m["num_attention_heads"], max_position_embeddings=m["max_position_embeddings"],
        hidden_act=m.get("hidden_act", "gelu"), layer_norm_eps=m.get("layer_norm_eps", 1e-12),
        pad_token_id=m.get("pad_token_id", 0),
    )
    return vision, text, tuple(widths)


def image_reward_transform(image_size: int):
    """ImageReward's ``_transform``: PIL bicubic resize and centre crop, ToTensor, OpenAI normalisation."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(OPENAI_MEAN, OPENAI_STD),
    ])


def blip_tokenizer(tokenizer):
    """BLIP's ``init_tokenizer``: BERT's uncased tokenizer plus ``[DEC]`` (bos) and ``[ENC]``."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardReward(ModelReward):
    """ImageReward v1.0: how much people prefer an image for its prompt (about -2 to 2; 0 is the
    mean of its training images).

    ``checkpoint``, ``med_config``: local files instead of ``THUDM/ImageReward``'s; ``tokenizer``: a
    BERT uncased tokenizer (hub id or folder); ``vision_heads``: attention heads of the image encoder
    (default: width / 64, as in BLIP's ViTs).
    """

    name = "image_reward"

    def __init__(self, checkpoint: str | None = None, med_config: str | None = None, tokenizer: str = TOKENIZER,
                 vision_heads: int | None = None, batch_size: int = 32, dtype=None, device=None):
        super().__init__(batch_size, dtype, device)
        self.checkpoint, self.med_config, self.tokenizer = checkpoint, med_config, str(tokenizer)
        self.vision_heads = vision_heads

    def build(self, local_only: bool):
        from transformers import AutoTokenizer

        files = load_all({
            "checkpoint": lambda: hub_file(self.checkpoint, REPO, CHECKPOINT, "checkpoint", local_only),
            "med_config": lambda: hub_file(self.med_config, REPO, MED_CONFIG, "med_config", local_only),
            "tokenizer": lambda: hub_pretrained(AutoTokenizer, self.tokenizer, "tokenizer", local_only),
        })
        path, med_path, tokenizer = files["checkpoint"], files["med_config"], blip_tokenizer(files["tokenizer"])
        try:
            med = json.loads(Path(med_path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ClipConfigError(f"image_reward: cannot read med config {med_path} ({err})") from None
        state = convert_checkpoint(load_state_dict_file(path))
        vision, text, widths = configs_from_checkpoint(state, med, self.vision_heads)
        model = ImageRewardModel(vision, text, widths)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ClipConfigError(f"image_reward: {path} does not fit {med_path}: {first}") from None
        model = model.to(self.device, self.dtype).eval()
        model.head.float()
        return model, image_reward_transform(vision.image_size), tokenizer

    def score_batch(self, images, prompts):
        model, preprocess, tokenizer = self.scorer
        pixels = torch.stack([preprocess(image) for image in images]).to(self.device, self.dtype)
        tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
