"""Evaluation: eval loss and generation metrics, base beside fine-tuned; the terminal table, Markdown and HTML."""
