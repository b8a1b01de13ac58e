"""``python -m vlmfix`` runs the CLI."""

import sys

from vlmfix.cli import main

sys.exit(main())
