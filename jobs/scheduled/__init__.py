"""`capfilt run-job`: a scheduled ingest -> curate -> release job (run_job) from a YAML job file (job_file)."""
