"""`raft-diffusion sample` from a checkout: `python scripts/sample.py --help`."""

import sys

from raft_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
