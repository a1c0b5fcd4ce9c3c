"""philora: LoRA and QLoRA fine-tuning for the Phi-3 family and any Hugging Face causal LM."""

__version__ = "0.1.0"
