"""Pure functions shared by every stage: image decoding, caption cleaning, row schemas,
the synthetic world and per-sample seeding. Nothing here imports a model or Beam."""
