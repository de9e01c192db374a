"""Triton kernels, imported as `moeserve.kernels` (see pyproject's package-dir mapping).

Empty until the kernels issue lands: the expert backend registry (moeserve.model.moe.experts)
and the attention interface (moeserve.model.attention) are the seams they plug into.
"""
