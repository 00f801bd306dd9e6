"""``python -m lumen_cli``: the same as the ``lumen`` command."""

from lumen_cli.main import main

raise SystemExit(main())
