"""What a demo model's samples are made of, term by term of the gold score, and what best-of-K keeps.

    python scripts/demo_terms.py                                   # the base model
    python scripts/demo_terms.py --lora runs/demo/checkpoints/000005
    python scripts/demo_terms.py --learn-centred 150               # can the LoRA learn centring at all?

Samples ``--prompts`` training prompts of ``demo_fit`` (the validation split's training side) ``--k``
times each from fresh seeds, and prints for all samples, for the proxy's best of K per prompt and
for the gold's best of K: gold, its four terms, alignment (colour and shape right) and the proxy.
A diagnostic of the demo world: it reads the gold, which runs never do.

``--learn-centred STEPS`` fine-tunes the model (the config's recipe, ``STEPS`` steps twice) on its
own samples moved in latent space so that every shape sits at the centre, and prints the size and
centring of fresh samples after each round: an upper bound on how fast the LoRA can learn
position when every training image shows it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raft_diffusion.adapters import build_adapter  # noqa: E402
from raft_diffusion.core.config import load_config  # noqa: E402
from raft_diffusion.core.protocols import Candidate  # noqa: E402
from raft_diffusion.demo import world  # noqa: E402
from raft_diffusion.rewards import build_reward  # noqa: E402
from raft_diffusion.recipe import make_accelerator, quiet_model_libraries  # noqa: E402


def describe(name: str, images: list, prompts: list[str], proxy: np.ndarray) -> None:
    terms = world.gold_terms(images)
    align = world.gold_alignment_parts(images, prompts)
    cells = [f"gold {world.gold_aesthetic(images).mean():.3f}"]
    cells += [f"{t} {terms[t].mean():.3f}" for t in world.TERMS]
    cells += [f"alignment {align['both'].mean():.3f} (colour {align['colour'].mean():.3f}, shape {align['shape'].mean():.3f})"]
    cells += [f"proxy {proxy.mean():.3f}"]
    print(f"{name:<16} " + "  ".join(cells))


def centroids(images: list) -> np.ndarray:
    """(x, y) of each shape in pixels; the frame's centre for an image with no shape."""
    out = []
    for image in images:
        a = world.analyze(image)
        ys, xs = np.nonzero(a.mask) if a.found else ([world.SIZE / 2 - 0.5], [world.SIZE / 2 - 0.5])
        out.append((np.mean(xs), np.mean(ys)))
    return np.array(out)


def learn_centred(adapter, candidates: list, prompts: list[str], k: int, steps: int) -> None:
    """Fine-tune on ``candidates`` rolled so that each shape is centred; report fresh samples."""
    factor = world.SIZE / adapter.latent_shape[-1]
    centre = (world.SIZE - 1) / 2
    targets = []
    for cand, (x, y) in zip(candidates, centroids([c.output for c in candidates])):
        # The background is plain, so a roll of the latents moves the shape and nothing else.
        shift = (int(round((centre - y) / factor)), int(round((centre - x) / factor)))
        latents = torch.roll(cand.payload["latents"], shifts=shift, dims=(1, 2))
        targets.append(Candidate(cand.prompt, cand.seed, None, {**cand.payload, "latents": latents},
                                 cand.prompt_index, cand.k_index))
    seeds = [900_000 + i for i in range(len(prompts) * k)]
    before = [c.output for c in adapter.generate(prompts, k, seeds)]
    start = centroids(before)
    print(f"fresh seeds, before:  size {world.gold_terms(before)['size'].mean():.3f}  "
          f"centring {world.gold_terms(before)['centring'].mean():.3f}")
    for round_ in (1, 2):
        adapter.finetune(targets)
        after = [c.output for c in adapter.generate(prompts, k, seeds)]
        terms = world.gold_terms(after)
        corr = np.corrcoef(start[:, 0], centroids(after)[:, 0])[0, 1]
        print(f"after {round_ * steps:4d} steps:  size {terms['size'].mean():.3f}  centring {terms['centring'].mean():.3f}  "
              f"(shape x positions correlate {corr:.2f} with the same seeds' before)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--lora", help="a run's checkpoint folder (checkpoints/NNNNNN) to sample from")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--learn-centred", type=int, metavar="STEPS", default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)

    overrides = list(args.overrides)
    if args.learn_centred:
        overrides.append(f"train.steps_per_stage={args.learn_centred}")
    config = load_config(args.config, overrides)
    torch.set_num_threads(config.run.cpu_threads or torch.get_num_threads())
    quiet_model_libraries()
    adapter = build_adapter(config, make_accelerator(config))
    if args.lora:
        adapter.load(args.lora)
    reward = build_reward(config.rewards, device="cpu")
    prompts = world.fit_prompts()[: args.prompts]
    candidates = adapter.generate(prompts, args.k, [500_000 + i for i in range(len(prompts) * args.k)])
    images, flat_prompts = [c.output for c in candidates], [c.prompt for c in candidates]
    proxy = np.asarray(reward(images, flat_prompts), dtype=np.float64)
    gold = world.gold_aesthetic(images)
    rows = np.arange(len(prompts)) * args.k
    for name, idx in (("all samples", np.arange(len(images))),
                      (f"proxy best of {args.k}", proxy.reshape(-1, args.k).argmax(1) + rows),
                      (f"gold best of {args.k}", gold.reshape(-1, args.k).argmax(1) + rows)):
        describe(name, [images[i] for i in idx], [flat_prompts[i] for i in idx], proxy[idx])
    if args.learn_centred:
        learn_centred(adapter, candidates, prompts, args.k, args.learn_centred)
    return 0


if __name__ == "__main__":
    sys.exit(main())
