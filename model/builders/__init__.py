"""Model directories the project writes: tiny models and tokenizers, converted BLIP checkpoints, staged output dirs."""
