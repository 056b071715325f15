"""sigil-feed: a gRPC sidecar that serves tokenized, packed training batches."""

__version__ = "0.1.0"
