"""oats: post-training compression of transformers (OATS, Wanda, SparseGPT, OWL, OPTIMA) on one pipeline."""
__version__ = "0.1.0"
