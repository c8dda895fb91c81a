"""The bundled pretraining loop: losses, the BLIP / BLIP-2 / CLIP objectives, the training data stream and the loop."""
