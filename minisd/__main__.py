"""`python -m minisd`: the same as the `minisd` command (minisd/cli.py)."""

import sys

from minisd.cli import main

if __name__ == "__main__":
    sys.exit(main())
