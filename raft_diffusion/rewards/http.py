"""``http``: a reward served by another process (a model too large to share the GPU, a VLM judge).

Each batch is POSTed as JSON, ``{"prompts": [...], "images": [base64 PNG, ...]}`` for images or
``{"prompts": [...], "texts": [...]}`` for text, and the answer is read as ``{"scores": [...]}``, one
float per output. Connection failures, timeouts and 5xx answers are retried with exponential
back-off; then, or on any other bad answer, the run ends in one line naming the URL and what
failed. ``load()`` (before the first sample) posts an empty batch, so an unreachable server ends a
run at once. ``examples/reward_server.py`` serves any registered reward this way.

Only the standard library's urllib is used: no client dependency for a few JSON requests.
"""

from __future__ import annotations

import base64
import io
import json
import math
import socket
import time
import urllib.error
import urllib.request

import torch

from raft_diffusion.rewards.registry import RewardError


def encode_png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_png(text: str):
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return image.convert("RGB")


def request_body(outputs: list, prompts: list[str]) -> dict:
    """The JSON a served reward receives: texts as they are, images as base64 PNG (lossless)."""
    if outputs and all(isinstance(o, str) for o in outputs):
        return {"prompts": list(prompts), "texts": list(outputs)}
    from aesthetic.loading import as_pil_images

    return {"prompts": list(prompts), "images": [encode_png(image) for image in as_pil_images(outputs)]}


def _error_detail(raw: bytes) -> str:
    """The first line of an error answer, or its ``error`` field when it is JSON."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        answer = json.loads(text)
        text = str(answer["error"]) if isinstance(answer, dict) and "error" in answer else text
    except ValueError:
        pass
    return text.splitlines()[0] if text else ""


class _Retry(Exception):
    """A failure worth another try (no answer, a timeout, a 5xx)."""


class HttpReward:
    """POST each batch of ``batch_size`` outputs to ``url``; wait ``timeout`` seconds for an answer;
    retry a failed request ``retries`` times, after ``backoff``, 2 x ``backoff``, ... seconds."""

    name = "http"

    def __init__(self, url: str, timeout: float = 60.0, batch_size: int = 16, retries: int = 3, backoff: float = 1.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise RewardError(f"http reward: url must start with http:// or https://, got {url!r}")
        if int(batch_size) < 1 or int(retries) < 0 or not float(timeout) > 0 or float(backoff) < 0:
            raise RewardError("http reward: needs batch_size >= 1, retries >= 0, timeout > 0 and backoff >= 0")
        self.url, self.timeout, self.batch_size = url, float(timeout), int(batch_size)
        self.retries, self.backoff = int(retries), float(backoff)

    def load(self) -> None:
        """Ask the server once (an empty batch) before the run makes anything."""
        self._post({"prompts": [], "images": []}, 0)

    def __call__(self, outputs: list, prompts: list[str]) -> torch.Tensor:
        prompts = [str(p) for p in prompts]
        scores = []
        for i in range(0, len(outputs), self.batch_size):
            batch = outputs[i : i + self.batch_size]
            scores.extend(self._post(request_body(batch, prompts[i : i + self.batch_size]), len(batch)))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body: dict, n: int) -> list[float]:
        data = json.dumps(body).encode("utf-8")
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._parse(self._send(data), n)
            except _Retry as err:
                problem = str(err)
        tries = f"{self.retries + 1} attempts" if self.retries else "1 attempt"
        raise RewardError(f"http reward {self.url}: {problem} ({tries})")

    def _send(self, data: bytes) -> bytes:
        request = urllib.request.Request(self.url, data=data, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            what = f"HTTP {err.code} {err.reason}" + (f": {detail}" if (detail := _error_detail(err.read(500))) else "")
            if err.code >= 500:
                raise _Retry(what) from None
            raise RewardError(f"http reward {self.url}: {what}") from None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            raise _Retry(f"no answer ({type(reason).__name__}: {reason})" if str(reason) else "no answer") from None

    def _parse(self, raw: bytes, n: int) -> list[float]:
        try:
            answer = json.loads(raw)
        except ValueError:
            raise RewardError(f"http reward {self.url}: the answer is not JSON ({raw[:80]!r})") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != n:
            got = f"{len(scores)} scores" if isinstance(scores, list) else "no 'scores' list"
            raise RewardError(f"http reward {self.url}: expected {{\"scores\": [...]}} with {n} numbers, got {got}")
        if not all(s is None or isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardError(f"http reward {self.url}: scores must be numbers (or null for no score)")
        return [float(s) if s is not None else math.nan for s in scores]
