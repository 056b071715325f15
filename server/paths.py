"""Where sigil-feed keeps what it makes when no setting places it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """Token stores, digests and tokenizer snapshots that no setting places: `$SIGIL_FEED_CACHE`, else
    `~/.cache/sigil-feed`."""
    return Path(os.environ.get("SIGIL_FEED_CACHE", Path.home() / ".cache" / "sigil-feed"))
