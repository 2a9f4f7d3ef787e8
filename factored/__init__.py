"""The compressed-layer runtime: a linear layer held as a sparse part plus a low-rank pair
(``module.SparseLowRankLinear``), saving and loading models that hold such layers, the forward each
layer computes with (chosen by measurement, ``forward``) and the compiled CPU kernels (``kernels``).

Not part of any method: every factored method's compress mode and the export use it. Imports nothing
of the project but ``data`` (the cache directory and atomic writes).
"""
