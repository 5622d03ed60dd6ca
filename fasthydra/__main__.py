"""`python -m fasthydra ...`: the same commands as the `fasthydra` console script."""

import sys

from fasthydra.cli import main

if __name__ == "__main__":
    sys.exit(main())
