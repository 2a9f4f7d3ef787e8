"""Sparse + low-rank methods, registered in ``oats.registry``: ``oats`` (alternating thresholding of the
scaled weight, Zhang & Papyan, ICLR 2025) and ``gram_slr`` (full-Gram sparse + low-rank). They share
``common``: the OATS budget split, the record's budget facts, ``rank_ratio``, the checks, and the
compress-mode module.
"""
