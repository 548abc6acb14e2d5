"""``raft-diffusion sample``: images from a diffusers text-to-image pipeline of a supported family (plus an
optional LoRA) through the sampler the RAFT loop uses.

    raft-diffusion sample --model demo:sd --lora runs/demo/final --prompt "a red circle" --n 8 --out samples/

Without flags the settings are the stock pipeline's: the model folder's own scheduler, its steps and
guidance (SD 50 and 7.5, SDXL 50 and 5, SD3 28 and 7, FLUX 28 and 3.5), the model's image size,
float32; image ``j`` of prompt ``i`` is drawn from seed
``--seed + i * n + j`` and is the image ``pipe(prompt, generator=torch.Generator().manual_seed(seed))``
draws. ``--config runs/NAME/config.yaml`` takes the run's settings instead, to reproduce its samples.
Files are named ``{index:03d}_seed{seed}.png``, ``samples.jsonl`` lists file, prompt and seed, and
``grid.png`` shows one row per prompt. Bad input (a missing model or LoRA folder, a LoRA made for
another model) raises a one-line error (:class:`SampleError` for the command's own arguments).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from raft_diffusion.core.config import from_dict, load_yaml
from raft_diffusion.core.errors import UserError

class SampleError(UserError):
    """Bad arguments to the sample command, or an output folder that cannot be written."""


# What the stock pipeline's from_pretrained does by default, where the run config's defaults differ;
# diffusion.steps/guidance_scale left unset are the pipeline's own defaults too.
STOCK_MODEL = {"dtype": "float32"}
STOCK_DIFFUSION = {"scheduler": "pretrained"}


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="pipeline folder, hub id or demo:NAME (default: the config's, else demo:sd)")
    parser.add_argument("--lora", help="an exported LoRA folder (e.g. runs/NAME/final)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several prompts")
    parser.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")
    parser.add_argument("--config", help="take model and sampling settings from a run config (flags override)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    parser.add_argument("--guidance-scale", type=float, help="guidance scale (default: the pipeline's; 1: off)")
    parser.add_argument("--eta", type=float, help="DDIM eta")
    parser.add_argument("--height", type=int, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's)")
    parser.add_argument("--negative-prompt", help="negative prompt for guidance")
    parser.add_argument("--max-sequence-length", type=int, help="T5 tokens per prompt (SD3, FLUX; default: the pipeline's)")
    parser.add_argument("--scheduler", help="ddim | ddpm | dpm++ | euler | euler_a | pndm | unipc, or a diffusers class name "
                        "(default: the model folder's own)")
    parser.add_argument("--batch-size", type=int, help="images per denoiser call")
    parser.add_argument("--dtype", help="auto | float32 | float16 | bfloat16 (default float32, as the stock pipeline)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def _config(args):
    data = load_yaml(args.config) if args.config else {"model": dict(STOCK_MODEL), "diffusion": dict(STOCK_DIFFUSION)}
    model, diffusion, sampling = (data.setdefault(key, {}) for key in ("model", "diffusion", "sampling"))
    data["selection"] = {}  # sampling needs no trajectories
    model_flags = dict(pretrained=args.model, init_lora=args.lora, dtype=args.dtype, device=args.device)
    diffusion_flags = dict(scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                           height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                           max_sequence_length=args.max_sequence_length)
    model.update({k: v for k, v in model_flags.items() if v is not None})
    diffusion.update({k: v for k, v in diffusion_flags.items() if v is not None})
    if args.batch_size is not None:
        sampling["batch_size"] = args.batch_size
    diffusion["compile"] = False
    return from_dict(data)


def image_grid(images: list, rows: int):
    """Tile equally sized PIL images into ``rows`` rows."""
    from PIL import Image

    cols = math.ceil(len(images) / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def run(args) -> int:
    from accelerate import Accelerator

    from raft_diffusion.adapters.diffusion import DiffusionAdapter

    if args.n < 1:
        raise SampleError(f"--n must be >= 1, got {args.n}")
    config = _config(args)
    out = Path(args.out)
    try:  # before the model loads: a folder that cannot be written must not cost a round of sampling
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SampleError(f"--out {out}: cannot create the folder ({err.strerror or type(err).__name__})") from None
    # The run's precision settings, so that samples match the ones the loop drew.
    accelerator = Accelerator(
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum,
        cpu=config.model.device == "cpu",
    )
    adapter = DiffusionAdapter(config, accelerator)
    seeds = [args.seed + i for i in range(len(args.prompt) * args.n)]
    candidates = adapter.generate(args.prompt, args.n, seeds)

    try:
        with open(out / "samples.jsonl", "w", encoding="utf-8") as index:
            for i, c in enumerate(candidates):
                name = f"{i:03d}_seed{c.seed}.png"
                c.output.save(out / name)
                index.write(json.dumps({"file": name, "prompt": c.prompt, "seed": c.seed}) + "\n")
        image_grid([c.output for c in candidates], rows=len(args.prompt)).save(out / "grid.png")
    except OSError as err:
        raise SampleError(f"--out {out}: cannot write {err.filename or 'the images'} ({err.strerror or err})") from None
    print(f"wrote {len(candidates)} images and grid.png to {out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raft-diffusion sample", description=__doc__.splitlines()[0])
    return run(build_parser(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
