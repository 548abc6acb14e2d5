"""CLIP-based image scoring: the LAION aesthetic predictor and CLIP score, on open_clip models."""

from aesthetic.clip_score import CLIPScore
from aesthetic.loading import ClipConfigError, WeightsNotFoundError, load_clip
from aesthetic.predictor import AestheticHead, AestheticPredictor, HeadError

__all__ = [
    "AestheticHead",
    "AestheticPredictor",
    "CLIPScore",
    "ClipConfigError",
    "HeadError",
    "WeightsNotFoundError",
    "load_clip",
]
