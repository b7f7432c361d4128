"""Evaluation: perplexity and generation metrics."""
