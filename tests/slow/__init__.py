"""Slow tests on the real Rust corpus (make-rust-corpus); skipped unless SIGIL_FEED_CORPUS is set."""
