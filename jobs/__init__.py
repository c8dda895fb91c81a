"""The `capfilt` command line and the orchestration of whole jobs (synth, curate, pretrain,
bootstrap, release, ...). Each subcommand lives in its own module."""
