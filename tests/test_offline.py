"""Without network, every hub load fails at once with one line (no retries), HF_HUB_OFFLINE set or not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Each loader asked for a hub id that no cache holds, timed in a process where the hub is a closed
# local port and HF_HUB_OFFLINE is unset: huggingface_hub would retry each request with back-off.
LOADERS = """
import json, time
import diffusers, open_clip  # imported first: their import time is not what is measured
diffusers.DiffusionPipeline, diffusers.StableDiffusionPipeline, diffusers.AutoencoderKL
from transformers import AutoTokenizer
from raft_diffusion.adapters.diffusion import DiffusionSettings, load_pipeline
from raft_diffusion.rewards import build_reward
from raft_diffusion.adapters.llm import load_pretrained
from raft_diffusion.core.config import ModelConfig

results = {}
for name, load in [
    ("pipeline", lambda: load_pipeline(ModelConfig(pretrained="nobody/missing-sd"), DiffusionSettings())),
    ("llm", lambda: load_pretrained(AutoTokenizer, "nobody/missing-llm", "model.pretrained")),
    ("clip", lambda: build_reward([{"name": "aesthetic"}]).parts[0][2].load()),  # ViT-L-14/openai
    ("pickscore", lambda: build_reward([{"name": "pickscore"}]).parts[0][2].load()),
    ("hpsv2", lambda: build_reward([{"name": "hpsv2"}]).parts[0][2].load()),
    ("image_reward", lambda: build_reward([{"name": "image_reward"}]).parts[0][2].load()),
]:
    start = time.monotonic()
    try:
        load()
        message = "loaded"
    except Exception as err:
        message = f"{type(err).__name__}: {err}"
    results[name] = [time.monotonic() - start, message]
print(json.dumps(results))
"""


def test_missing_hub_ids_fail_fast_when_the_hub_cannot_be_reached(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", LOADERS], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Retrying" not in proc.stderr
    for name, (seconds, message) in results.items():
        assert "cannot be reached" in message and "\n" not in message, (name, message)
        assert seconds < 5, (name, seconds, message)  # huggingface_hub's retries alone take 23 s
    assert all("model.pretrained=/path/to/folder" in results[name][1] for name in ("pipeline", "llm"))
    assert all(results[name][1].startswith("WeightsNotFoundError") for name in ("clip", "pickscore", "hpsv2", "image_reward"))
