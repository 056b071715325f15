"""Constants both ends of the sigil_feed.v1 protocol must agree on (beside the .proto, imported by either side)."""

WAIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds, in seconds, of StepTiming.wait_counts' buckets (one more bucket counts the waits above)."""
