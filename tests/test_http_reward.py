"""The ``http`` reward against examples/reward_server.py on 127.0.0.1 (an ephemeral port; the server
stops by itself after a few idle seconds, and the test ends it when done)."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.rewards import RewardError, build_reward
from raft_diffusion.recipe import load_reward_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server_url():
    cmd = [sys.executable, str(ROOT / "examples" / "reward_server.py"), "--reward", "tests.plugins:prompt_and_output",
           "--port", "0", "--idle-exit", "20", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if not line or not line[0].startswith("serving"):
        proc.kill()
        pytest.fail(f"reward server did not start: {proc.stderr.read() if proc.poll() is not None else 'no answer'}")
    yield line[0].split(" on ")[1].strip()
    proc.terminate()
    proc.wait(timeout=10)


def test_http_gives_the_served_rewards_scores_exactly(server_url):
    from tests.plugins import prompt_and_output

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = ["a", "bb", "a cat", "", "four"]
    reward = build_reward([{"name": "http", "args": {"url": server_url, "batch_size": 2, "timeout": 10}}])
    load_reward_models(reward, "rewards")  # asks the server once, before any sample
    expected = torch.tensor(prompt_and_output(images, prompts), dtype=torch.float32)
    assert torch.equal(reward(images, prompts), expected)  # PNG is lossless: the very same scores
    texts = ["good", "a longer response", "x"]
    assert reward(texts, prompts[:3]).tolist() == [float(v) for v in prompt_and_output(texts, prompts[:3])]


def test_http_failures_are_one_line_naming_the_url(server_url):
    reward = build_reward([{"name": "http", "args": {"url": server_url, "retries": 1, "backoff": 0.01}}])
    with pytest.raises(RewardError, match=rf"http reward {server_url}: HTTP 500 .*reward failed: RuntimeError: boom was asked for \(2 attempts\)"):
        reward(["x"], ["boom"])
    bad = build_reward([{"name": "http", "args": {"url": server_url.rstrip("/") + "/", "retries": 0}}])
    with pytest.raises(RewardError, match=r"HTTP 400 .*bad request"):
        bad.parts[0][2]._post({"prompts": ["a"]}, 1)

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    reward = build_reward([{"name": "http", "args": {"url": closed, "retries": 2, "backoff": 0.01, "timeout": 2}}])
    with pytest.raises(RewardError) as err:
        load_reward_models(reward, "rewards")
    assert str(err.value).startswith(f"http reward {closed}: no answer") and "(3 attempts)" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(RewardError, match="url must start with http"):
        build_reward([{"name": "http", "args": {"url": "localhost:8000"}}])
