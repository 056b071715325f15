"""The token store: format, filesystems, build lease, node-local shard cache and build engines, one file each."""
