"""Leaving philora: merge with its parity check, GGUF (llama.cpp) with its vocabulary, Ollama."""
