"""Cached mode: tokenize once into a memory-mapped token store, then serve epochs by permutation."""
