"""ddk: domain-aware knowledge distillation (DDK, arXiv 2407.16154) for Hugging Face causal LMs."""

__version__ = "0.2.0"
