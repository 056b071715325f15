"""The token store: its format, the filesystems it lives on, how it is built and how it is read."""
