"""``python -m nibble`` and the ``nibble`` console script: the same command line as the binary."""

import sys


def main() -> None:
    """Runs ``nibble`` with ``sys.argv[1:]`` and exits with its code (0 done, 1 error, 2 usage)."""
    from . import main as run

    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
