"""``python -m wasidispatch``: the same as the ``wasidispatch`` command."""

from wasidispatch.cli import main

raise SystemExit(main())
