import numpy as np
import open_clip
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import save_file

from aesthetic import AestheticPredictor, ClipConfigError, HeadError, WeightsNotFoundError
from aesthetic.loading import load_clip, parse_dtype
from aesthetic.predictor import DEFAULT_HEAD, load_head
from clip_fixtures import (  # noqa: F401  (fixtures)
    clip_configs,
    demo_dir,
    make_clip,
    sample_images,
    tiny_clip,
    tiny_clip_768,
    tiny_head_state,
)

pytestmark = pytest.mark.floor  # in the fast subset that `make test-min` runs at the dependency floors


def plain_head(path) -> nn.Sequential:
    """The LAION MLP written out by hand, loaded from the same file."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    seq = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    seq.load_state_dict({k.removeprefix("layers."): v for k, v in sd.items()})
    return seq.eval()


def manual_scores(model, preprocess, head, images) -> torch.Tensor:
    pixels = torch.stack([preprocess(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        emb = model.float().encode_image(pixels)
        return head(emb / emb.norm(dim=-1, keepdim=True)).reshape(-1)


def test_packaged_head_matches_plain_sequential():
    torch.manual_seed(0)
    emb = torch.randn(6, 768)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    head = load_head(DEFAULT_HEAD, 768).eval()
    with torch.no_grad():
        expected = plain_head(DEFAULT_HEAD)(emb)
        got = head(emb)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert got.std() > 0  # the head is not constant on distinct embeddings


def test_score_is_head_of_normalised_clip_embedding(tiny_clip_768):
    model, preprocess = tiny_clip_768
    images = sample_images(4)
    expected = manual_scores(model, preprocess, plain_head(DEFAULT_HEAD), images)
    predictor = AestheticPredictor(model, preprocess, DEFAULT_HEAD, device="cpu")
    got = predictor.score(images)
    assert got.dtype == torch.float32 and got.shape == (4,) and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictor.score(images), got, rtol=0, atol=0)  # eval mode: dropout is off
    emb = predictor.embed(images)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_real_head_on_small_clip_names_file_and_shapes(tiny_clip, clip_configs):
    model, preprocess = tiny_clip
    with pytest.raises(HeadError, match=r"layers\.0\.weight \[1024, 32\]") as err:
        AestheticPredictor(model, preprocess, DEFAULT_HEAD, device="cpu")
    assert str(DEFAULT_HEAD) in str(err.value) and "[1024, 768]" in str(err.value)
    # from_pretrained with no head uses the packaged LAION head: same error
    with pytest.raises(HeadError, match="sac\\+logos"):
        AestheticPredictor.from_pretrained(clip=clip_configs["tiny-clip"], pretrained=None, device="cpu")


def test_head_widths_are_read_from_state_dict(tiny_clip):
    model, preprocess = tiny_clip
    state = tiny_head_state(32)
    head = nn.Sequential(
        nn.Linear(32, 24), nn.Dropout(0.2), nn.Linear(24, 12), nn.Dropout(0.2),
        nn.Linear(12, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1),
    )  # fmt: skip
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    images = sample_images(3)
    got = AestheticPredictor(model, preprocess, state, device="cpu").score(images)
    torch.testing.assert_close(got, manual_scores(model, preprocess, head.eval(), images), rtol=1e-5, atol=1e-5)
    # a module works as the head too
    torch.testing.assert_close(AestheticPredictor(model, preprocess, head, device="cpu").score(images), got)


def test_head_file_formats_and_bad_files(tiny_clip, tmp_path):
    model, preprocess = tiny_clip
    state = tiny_head_state(32)
    torch.save(state, tmp_path / "head.pth")
    save_file(state, tmp_path / "head.safetensors")
    images = sample_images(3)
    from_pth = AestheticPredictor(model, preprocess, tmp_path / "head.pth", device="cpu").score(images)
    from_st = AestheticPredictor(model, preprocess, str(tmp_path / "head.safetensors"), device="cpu").score(images)
    torch.testing.assert_close(from_st, from_pth, rtol=0, atol=0)

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HeadError, match="junk.pth"):
        AestheticPredictor(model, preprocess, tmp_path / "junk.pth", device="cpu")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(HeadError, match=r"list\.pth is not an MLP head state dict"):
        AestheticPredictor(model, preprocess, tmp_path / "list.pth", device="cpu")
    with pytest.raises(HeadError, match="not an MLP head"):
        AestheticPredictor(model, preprocess, {"layers.0.weight": torch.zeros(4, 32)}, device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        AestheticPredictor(model, preprocess, tmp_path / "missing.pth", device="cpu")


def test_input_kinds_give_the_same_scores(tiny_clip):
    model, preprocess = tiny_clip
    predictor = AestheticPredictor(model, preprocess, tiny_head_state(32), device="cpu")
    arrays = sample_images(5)
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    from_pil = predictor.score([Image.fromarray(a) for a in arrays])
    torch.testing.assert_close(predictor.score(arrays), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(predictor.score(tensors), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(predictor.score(torch.stack(tensors)), from_pil, rtol=0, atol=0)
    torch.testing.assert_close(predictor.score(np.stack(arrays)), from_pil, rtol=0, atol=0)
    assert from_pil.unique().numel() == 5  # distinct images, distinct scores
    assert predictor.score([]).shape == (0,)
    with pytest.raises(ValueError, match="batch"):
        predictor.score(tensors[0])


def test_batch_size_does_not_change_scores(tiny_clip):
    model, preprocess = tiny_clip
    images = sample_images(7)
    one = AestheticPredictor(model, preprocess, tiny_head_state(32), device="cpu", batch_size=1).score(images)
    three = AestheticPredictor(model, preprocess, tiny_head_state(32), device="cpu", batch_size=3).score(images)
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)


def test_low_precision_clip_keeps_fp32_head(clip_configs):
    images = sample_images(4)
    model, preprocess = make_clip("tiny-clip", seed=1)
    ref = AestheticPredictor(model, preprocess, tiny_head_state(32), device="cpu").score(images)
    model, preprocess = make_clip("tiny-clip", seed=1)
    low = AestheticPredictor(model, preprocess, tiny_head_state(32), device="cpu", dtype="bf16")
    assert next(low.clip_model.parameters()).dtype == torch.bfloat16
    assert next(low.head.parameters()).dtype == torch.float32
    got = low.score(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=0.05)
    assert parse_dtype(None, "cuda") == torch.float16 and parse_dtype(None, "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("fp8")


def test_from_pretrained_with_config_file_and_local_checkpoint(clip_configs, tmp_path):
    model, preprocess = make_clip("tiny-clip", seed=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    torch.save(tiny_head_state(32), tmp_path / "head.pth")
    images = sample_images(3)
    expected = AestheticPredictor(model, preprocess, tmp_path / "head.pth", device="cpu").score(images)
    loaded = AestheticPredictor.from_pretrained(
        clip=clip_configs["tiny-clip"],
        pretrained=str(tmp_path / "weights.safetensors"),
        head=tmp_path / "head.pth",
        device="cpu",
    )
    torch.testing.assert_close(loaded.score(images), expected, rtol=0, atol=0)
    # weights for another architecture: one clear error
    with pytest.raises(ClipConfigError, match="do not fit model tiny-clip-768"):
        load_clip(clip_configs["tiny-clip-768"], str(tmp_path / "weights.safetensors"))


def test_demo_layout(demo_dir):
    from raft_diffusion.rewards import build_reward

    reward = build_reward([{"name": "aesthetic", "args": {"clip": "demo"}}], device="cpu")
    _, _, part = reward.parts[0]
    assert part.kwargs["clip"] == f"{demo_dir / 'clip'}/demo-clip.json"  # the packaged folder's config and weights
    assert part.kwargs["pretrained"] == f"{demo_dir / 'clip'}/open_clip_model.safetensors"
    assert part.head == str(demo_dir / "aesthetic_head.pth")
    model, preprocess = make_clip("tiny-clip", seed=3)  # the weights the demo folder holds
    images = sample_images(3)
    expected = AestheticPredictor(model, preprocess, demo_dir / "aesthetic_head.pth", device="cpu").score(images)
    torch.testing.assert_close(reward(images, [""] * 3), expected, rtol=0, atol=0)


def empty_hub_cache(monkeypatch, tmp_path):
    """Point the Hugging Face cache at an empty folder, so that no weights a developer has cached are found."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_missing_weights_offline_is_one_clear_error(monkeypatch, clip_configs, tmp_path):
    empty_hub_cache(monkeypatch, tmp_path)
    with pytest.raises(WeightsNotFoundError, match="ViT-L-14/openai are not in the local cache") as err:
        AestheticPredictor.from_pretrained(clip="ViT-L-14", pretrained="openai", device="cpu")
    assert isinstance(err.value, FileNotFoundError) and "\n" not in str(err.value)
    # What would load local files instead (OpenAI weights from a bare file need the QuickGELU model), for a
    # command line to write in its own syntax.
    assert err.value.fix == {"clip": "ViT-L-14-quickgelu", "pretrained": "/path/to/open_clip_pytorch_model.bin"}
    with pytest.raises(WeightsNotFoundError, match="not an open_clip tag"):
        load_clip(clip_configs["tiny-clip"], "/no/such/weights.bin")
    with pytest.raises(ClipConfigError, match="unknown CLIP model"):
        load_clip("ViT-Nope-1", None)
    with pytest.raises(ClipConfigError, match="not found"):
        load_clip("/no/such/config.json", None)


def test_tag_weights_load_from_the_hub_cache_with_the_tags_settings(monkeypatch, clip_configs, tmp_path):
    """A tag's weights found in the Hugging Face cache load without the hub, with the tag's activation and
    normalisation, exactly as open_clip loads the tag."""
    cache = empty_hub_cache(monkeypatch, tmp_path)
    snapshot = cache / "models--test-org--tiny-clip" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (cache / "models--test-org--tiny-clip" / "refs").mkdir()
    (cache / "models--test-org--tiny-clip" / "refs" / "main").write_text("abc123")
    model, _ = make_clip("tiny-clip", seed=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, snapshot / "open_clip_model.safetensors")
    tag = {"hf_hub": "test-org/tiny-clip/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    lookup = lambda name, pretrained: tag if pretrained == "mytag" else {}  # noqa: E731
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lookup)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", lookup)

    loaded, preprocess, _ = load_clip(clip_configs["tiny-clip"], "mytag")
    assert {type(x).__name__ for x in loaded.modules() if "GELU" in type(x).__name__} == {"QuickGELU"}
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.25, 0.25, 0.25)


def test_pretrained_tag_sets_its_activation(monkeypatch, clip_configs, tmp_path):
    model, _ = make_clip("tiny-clip", seed=7)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    tag = {"file": str(tmp_path / "w.safetensors"), "quick_gelu": True}  # a tag like "openai"
    lookup = lambda name, pretrained: tag if pretrained == "mytag" else {}  # noqa: E731
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lookup)
    monkeypatch.setattr(open_clip.factory, "get_pretrained_cfg", lookup)
    fetch = lambda cfg, *args, **kwargs: cfg["file"]  # noqa: E731  (open_clip reads a tag's "file" itself only from 2.31)
    monkeypatch.setattr(open_clip, "download_pretrained", fetch)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", fetch)
    tagged, _, _ = load_clip(clip_configs["tiny-clip"], "mytag")
    from_file, _, _ = load_clip(clip_configs["tiny-clip"], tag["file"])
    activations = lambda m: {type(x).__name__ for x in m.modules() if "GELU" in type(x).__name__}  # noqa: E731
    assert activations(tagged) == {"QuickGELU"} and activations(from_file) == {"GELU"}
    torch.testing.assert_close(tagged.state_dict(), from_file.state_dict())
