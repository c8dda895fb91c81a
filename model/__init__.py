"""Adapters over transformers and open_clip (captioner, filter, ranker), tiny model builders,
checkpoint conversion, and the bundled pretraining loop. Imports no Beam."""
