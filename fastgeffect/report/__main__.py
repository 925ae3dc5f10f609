"""``python -m fastgeffect.report``: see ``cli.py``."""
from .cli import main

raise SystemExit(main())
