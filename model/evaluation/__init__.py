"""Measuring models and curate runs: pure metrics, and the runs that feed them held-out data."""
