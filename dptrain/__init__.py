"""dptrain: differentially private training for PyTorch, built for fine-tuning language models."""

__version__ = "0.1.0"

__all__ = ["__version__"]
