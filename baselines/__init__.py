"""Baseline methods on the oats pipeline: one file each, registered in ``oats.registry``."""
