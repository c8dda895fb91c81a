"""`capfilt ingest`: img2dataset downloads (download), one run per --out (lock), shards checked against the list (check)."""
