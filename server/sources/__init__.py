"""Sources: read records from JSONL, Parquet and Hugging Face datasets (see `open_source`)."""
