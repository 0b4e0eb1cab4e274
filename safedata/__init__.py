"""Find the benign-looking fine-tuning data that breaks an aligned LLM's safety."""
__version__ = "0.1.0"
