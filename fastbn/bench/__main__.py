"""Entry point: ``python -m fastbn.bench`` (``--help`` documents everything)."""

import sys

from fastbn.bench.cli import main

sys.exit(main())
