"""Pure-sparse methods on the oats pipeline (dense, magnitude, Wanda, SparseGPT): one file each,
registered in ``oats.registry``."""
