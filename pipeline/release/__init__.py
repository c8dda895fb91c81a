"""Dataset releases: the build, dedup and decontamination, shard I/O, the manifest and card, report.html."""
