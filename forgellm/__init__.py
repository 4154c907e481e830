"""ForgeLLM: continue pre-training and instruction-tune language models with MLX."""

__version__ = "0.1.0"
