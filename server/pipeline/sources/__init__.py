"""Sources: read records from JSONL, Parquet and Hugging Face datasets (`opening.open_source` picks the reader;
`base.Source` is what every reader is)."""
