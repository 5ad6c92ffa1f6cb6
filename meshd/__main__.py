"""``python -m meshd``: the same command line as the ``meshd`` script."""

from meshd.ops.cli import main

raise SystemExit(main())
