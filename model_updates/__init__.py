"""Model updates (config key ``model_update``): the whole compressed model improved end to end after
its last block is compressed, masks and budget held fixed (low-rank recovery). Registered in ``oats.registry``."""
