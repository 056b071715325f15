"""The sigil-feed server: sources, samples, filters, mixing, tokenization, packing and the gRPC service."""
