"""Models: loading (a local dir, a hub id, the embedded default), the embedded SmolLM2 → Phi-3 conversion, Phi-3's
fused layout (the one table), and the training objective computed on a model's hidden states."""
