"""The synthetic noisy-web world: scenes and captions (scenes), drawing (render), shards plus truth on disk (world)."""
