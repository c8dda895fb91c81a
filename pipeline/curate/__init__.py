"""The curate Beam pipeline: read shards (sources), decode, run the models (inference), select, write (sinks), run state."""
