"""Evaluation: length generalization (perplexity vs length), passkey retrieval, plots."""
