"""Private fine-tuning of Hugging Face causal language models."""
