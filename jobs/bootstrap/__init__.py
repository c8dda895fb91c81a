"""`capfilt bootstrap`: the rounds and ablations (rounds), their YAML config, stage records and the report."""
