"""`python -m sigil_feed.server.cli`."""

import sys

from .main import main

sys.exit(main())
