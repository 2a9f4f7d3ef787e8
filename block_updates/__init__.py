"""Block updates (config key ``block_update``): a block's kept weights improved after all its linears are
compressed, masks held fixed (block reconstruction). Registered in ``oats.registry``."""
