"""`python -m trainer.estimate [overrides]`: see trainer.estimate.cli."""

import sys

from trainer.estimate.cli import main

if __name__ == "__main__":
    sys.exit(main())
