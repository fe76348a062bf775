"""Corpora -> tokenizer -> memory-mapped token shards. Never imports `trainer`."""
