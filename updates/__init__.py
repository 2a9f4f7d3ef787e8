"""Weight updates after a method, mask held fixed: per layer (OPTIMA's row QPs) or per block (block
reconstruction). Registered in ``oats.registry``."""
