"""Inference: adapters on their base, the one token loop, terminal chat, the OpenAI-compatible server."""
