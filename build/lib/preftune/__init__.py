"""preftune: align causal language models to preferences with DPO and its family."""

__version__ = "0.1.0"
