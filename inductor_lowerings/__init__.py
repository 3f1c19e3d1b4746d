"""The compiler-facing side of the rewritten computations: custom-op registration, fake
kernels, aten decompositions, CPU kernels and Triton kernels (no hand-written Inductor
lowering; :mod:`inductor_lowerings.ops` says, per op, how it reaches Inductor).

Importing this package registers three operators (see :mod:`inductor_lowerings.ops` for
their contracts and :mod:`inductor_lowerings.triton_kernels` for the kernel designs):

* ``torch.ops.bdpass.bd_project`` -- a basis-decomposed projection: per head, the
  identity rows of ``x`` plus a GEMM over the remaining rows (one GEMM for all heads
  when they share their rows);
* ``torch.ops.bdpass.bd_linear`` -- a whole projection after basis decomposition: blocks
  of heads sharing a pivot table (identity rows plus a GEMM over the other rows) and dense
  column blocks, each written straight into its final columns; this is what the ``bd``
  backend emits (see :mod:`inductor_lowerings.bd_linear`);
* ``torch.ops.bdpass.pivot_linear`` -- a PIFA chain: the pivot GEMM and the
  coefficient GEMM, each writing its columns straight into their final places.

Triton is optional (``pip install "bdpass[triton]"``); without it the aten
implementation serves every device, and ``HAS_TRITON_KERNELS`` is False.
"""
from .ops import HAS_TRITON_KERNELS, bd_linear, bd_project, pivot_linear

__all__ = ["HAS_TRITON_KERNELS", "bd_linear", "bd_project", "pivot_linear"]
