"""The one entry file: `python train.py METHOD [--config FILE] [flags]`; see fvfunc/cli.py."""

import sys

import fvfunc.cli

if __name__ == "__main__":
    sys.exit(fvfunc.cli.main(sys.argv[1:]))
