import sys

from .cli import main

if __name__ == "__main__":  # the opd-train console script imports this module for main
    sys.exit(main())
