"""Files written whole or not at all: atomic writes, staged directory swaps, locks, content hashes, process checks."""
