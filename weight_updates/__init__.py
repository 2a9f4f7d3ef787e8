"""Weight updates (config key ``weight_update``): a method's kept weights improved per layer, mask held
fixed (OPTIMA's row QPs). Registered in ``oats.registry``."""
