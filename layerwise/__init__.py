"""Layerwise sparsity (config key ``layerwise``): a target sparsity -> one sparsity per block (OWL).
Registered in ``oats.registry``."""
