"""Models: loading (a local dir, a hub id, the embedded default), the embedded SmolLM2 → Phi-3 conversion."""
