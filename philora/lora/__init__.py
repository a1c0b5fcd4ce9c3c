"""LoRA for philora: target resolution and peft setup for Hugging Face models (`targets`)."""
