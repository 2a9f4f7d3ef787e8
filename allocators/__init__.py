"""Layerwise allocators: a target sparsity -> one sparsity per block (OWL). Registered in ``oats.registry``."""
