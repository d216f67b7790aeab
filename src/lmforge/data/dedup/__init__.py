"""De-duplication: exact document hashes, repeated lines and spans, MinHash-LSH near duplicates."""
