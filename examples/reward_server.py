"""Serve any registered reward over HTTP, for the ``http`` reward of a run on another machine or GPU.

    python examples/reward_server.py --reward pickscore --port 8000
    python examples/reward_server.py --reward aesthetic --reward-args '{"clip": "demo"}' --port 8000

and in the run's config::

    rewards:
      - {name: http, args: {url: "http://127.0.0.1:8000/", timeout: 60, batch_size: 16, retries: 3}}

It answers POSTed JSON ``{"prompts": [...], "images": [base64 PNG, ...]}`` (or ``"texts"``) with
``{"scores": [...]}`` (null for a non-finite score); a bad request gets 400, a reward that fails 500,
each with a one-line message. One request at a time (a reward model is not shared between threads),
with the standard library's ``http.server``. ``--idle-exit N`` stops the server after N seconds
without a request.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from raft_diffusion.rewards import build_reward
from raft_diffusion.rewards.http import decode_png


def make_handler(reward):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the name http.server calls)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts = [str(p) for p in body["prompts"]]
                outputs = list(body["texts"]) if "texts" in body else [decode_png(s) for s in body["images"]]
                if len(outputs) != len(prompts):
                    raise ValueError(f"{len(outputs)} outputs for {len(prompts)} prompts")
            except Exception as err:  # anything unreadable in the request is the client's mistake
                return self._answer(400, {"error": f"bad request: {type(err).__name__}: {err}"})
            try:
                scores = [float(s) for s in reward(outputs, prompts)] if outputs else []
            except Exception as err:  # the reward failed: say so in one line, keep serving
                return self._answer(500, {"error": f"reward failed: {type(err).__name__}: {err}".splitlines()[0]})
            self._answer(200, {"scores": [s if math.isfinite(s) else None for s in scores]})

        def _answer(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # one line per request on stderr, as http.server does, unless quiet
            if not self.server.quiet:
                super().log_message(format, *args)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reward", required=True, help="a registered reward name or module:function")
    parser.add_argument("--reward-args", default="{}", help="the reward's arguments as a JSON object")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    parser.add_argument("--device", help="device for model-based rewards (default: cuda if available)")
    parser.add_argument("--idle-exit", type=float, default=0.0, help="stop after this many seconds without a request (0: never)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args(argv)

    spec = {"target": args.reward} if ":" in args.reward else {"name": args.reward}
    try:
        reward_args = json.loads(args.reward_args)
        if not isinstance(reward_args, dict):
            raise ValueError("--reward-args must be a JSON object")
        reward = build_reward([{**spec, "args": reward_args}], device=args.device)
        for _, _, part in reward.parts:  # load the model before announcing the server
            if callable(getattr(part, "load", None)):
                part.load()
        server = HTTPServer((args.host, args.port), make_handler(reward))
    except (ValueError, OSError) as err:  # bad arguments, missing weights, a port in use: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    server.quiet = args.quiet
    idle = {"timed_out": False}
    if args.idle_exit > 0:
        server.timeout = args.idle_exit
        server.handle_timeout = lambda: idle.update(timed_out=True)
    host, port = server.server_address[:2]
    print(f"serving {args.reward} on http://{host}:{port}/", flush=True)
    try:
        while not idle["timed_out"]:
            server.handle_request()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
