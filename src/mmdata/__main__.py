"""``python -m mmdata ...`` is the ``mmdata`` command."""

from .cli import main

raise SystemExit(main())
