"""Generated Python for the sigil_feed.v1 protocol (regenerate with `make protos`)."""

from . import feed_pb2, feed_pb2_grpc

__all__ = ["feed_pb2", "feed_pb2_grpc"]
