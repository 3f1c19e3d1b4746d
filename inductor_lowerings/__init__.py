"""Custom ops (CPU decompositions and Triton kernels) for the rewritten computations."""
