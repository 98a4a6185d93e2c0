"""Entry point of ``python -m lookahead_ext.demo``."""
from .cli import main

raise SystemExit(main())
