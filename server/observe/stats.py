"""Where feed/served.py imports Throughput from; it lives in throughput.py (delete this module once served.py
imports `..observe.throughput`)."""

from .throughput import Throughput

__all__ = ["Throughput"]
