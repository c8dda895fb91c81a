"""The three CapFilt models at inference: captioner (sampling, fastpath), filter, ranker, and where they run (device)."""
