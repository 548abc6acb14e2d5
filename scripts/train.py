"""Train from a checkout: `python scripts/train.py --config configs/demo.yaml run.stages=3`,
or on several GPUs: `accelerate launch scripts/train.py --config configs/sd15_aesthetic_256.yaml`."""

import sys

from raft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
