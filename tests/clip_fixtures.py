"""Tiny open_clip models (random weights, registered from config files) for the CLIP-based tests."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from aesthetic.predictor import AestheticHead


def tiny_config(embed_dim: int) -> dict:
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }


@pytest.fixture(scope="session")
def clip_configs(tmp_path_factory) -> dict[str, str]:
    """Model-config files, registered with open_clip: ``tiny-clip`` (embed 32) and ``tiny-clip-768``."""
    folder = tmp_path_factory.mktemp("clip_configs")
    paths = {}
    for name, dim in (("tiny-clip", 32), ("tiny-clip-768", 768)):
        path = folder / f"{name}.json"
        path.write_text(json.dumps(tiny_config(dim)))
        open_clip.add_model_config(path)
        paths[name] = str(path)
    return paths


def make_clip(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess


@pytest.fixture
def tiny_clip(clip_configs):
    return make_clip("tiny-clip")


@pytest.fixture
def tiny_clip_768(clip_configs):
    return make_clip("tiny-clip-768")


def tiny_head_state(embed_dim: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return AestheticHead((embed_dim, 24, 12, 8, 4)).state_dict()


def sample_images(n: int = 5, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    """uint8 HWC arrays; not square-sized to the model so that resizing and cropping are exercised."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture
def demo_dir(tmp_path, monkeypatch, clip_configs):
    """A demo-asset folder in the packaged layout (tiny CLIP + tiny head), installed as the demo folder."""
    import raft_diffusion.assets as assets

    model, _ = make_clip("tiny-clip", seed=3)
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "model_config.json").write_text(json.dumps(tiny_config(32)))
    (tmp_path / "clip" / "demo-clip.json").write_text(json.dumps(tiny_config(32)))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp_path / "clip" / "open_clip_model.safetensors")
    torch.save(tiny_head_state(32, seed=4), tmp_path / "aesthetic_head.pth")
    monkeypatch.setattr(assets, "DEMO_DIR", tmp_path)
    return tmp_path


def color_image(rgb, size: int = 32, noise: int = 20, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb, dtype=np.int16) + rng.integers(-noise, noise + 1, (size, size, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))
