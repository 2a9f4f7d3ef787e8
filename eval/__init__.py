"""Evaluation: token perplexity, (later) zero-shot tasks and reports."""
