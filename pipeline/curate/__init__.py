"""The curate Beam pipeline: read shards (sources), decode, run the models (inference), select
(curated), write (sinks); errors, the run record (record) and the output directory's state."""
