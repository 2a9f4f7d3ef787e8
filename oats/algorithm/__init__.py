"""The OATS algorithm (Zhang & Papyan, ICLR 2025), one subpackage:

- ``decompose``: the budget split (``oats_budget``) and alternating thresholding (pure tensor kernels);
- ``method``: the registered ``oats`` method, with its config keys and checks;
- ``compressed``: compress mode's ``SparseLowRankLinear`` module and saving/loading models that hold it.
"""
