"""The README's main job (``make demo``): grows with the library; see the docstring of main()."""

from __future__ import annotations

import sys


def main() -> int:
    """Print what wasidispatch can do so far on this machine."""
    from wasidispatch.cli import main as cli_main

    return cli_main(["--help"])


if __name__ == "__main__":
    sys.exit(main())
