"""Pretrained decoders loaded into our own model code (SmolLM2-135M from a GGUF file)."""
