"""Cached mode: serve epochs of a token store (see server/store/) by a seeded order of its samples."""
