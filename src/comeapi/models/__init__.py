"""The models directory: which GGUF files there are, and the bundled default model."""
