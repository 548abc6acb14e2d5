"""`raft-diffusion score` from a checkout: `python scripts/score.py --help`."""

import sys

from raft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
