"""Roofline estimates of a site's original and rewritten time: the fallback of the cost
model when nothing can be timed (fake or meta tensors; see :mod:`bdpass.timing`, which
decides by measuring whenever the weights are real).

Each kernel costs ``max(flops / peak, bytes / bandwidth) / efficiency + launch``. The
rewritten form is accepted only if its estimate is at most ``1 - MARGIN`` of the
original's (never slower, with room for estimation error). The token count ``M`` is the
product of the site input's leading dimensions for the example inputs the graph was
compiled with (a dynamic graph keeps the decision made for its first shape).

The constants are round numbers: the CPU ones from a 2-core AVX-512 machine (fp32 GEMMs
~260 GFLOP/s, bf16 ~1.4 TFLOP/s, an index-gathering kernel ~1.2 ns per element), the CUDA
ones from data sheets (not calibrated on a GPU).

**Plausible speedups.** :func:`pifa_ideal` and :func:`bd_ideal` bound what a rewrite can
gain from the work it removes: the larger of its FLOP ratio and its ratio of bytes moved
(the original's time is at least ``max(F_o / peak, B_o / bw)`` and the rewrite does at least
its own FLOPs and bytes, so ``t_o / t_n <= max(F_o / F_n, B_o / B_n)`` when both run at the
same efficiency). A measured speedup above ``PLAUSIBLE`` times that bound is a bad
measurement (the machine was busy while the original ran), not a win: :mod:`bdpass.timing`
measures again and never applies or caches it as final. ``PLAUSIBLE = 1.15`` leaves room for
the two computations' different GEMM efficiencies: the largest measured ratio to the bound on
the 2-core CPU was 1.02 (PIFA d=2048, r=1024: 1.36x measured, FLOP bound 1.33x), while the
busy-machine timing that made an MLA block 0.76x of Inductor claimed 1.59x for ``kv_b_proj``
(bound 1.33x: 1.20 times it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MARGIN = 0.03
PLAUSIBLE = 1.15


@dataclass(frozen=True)
class DeviceModel:
    name: str
    peak: dict            # dtype -> FLOP/s of a large GEMM
    bandwidth: float      # bytes/s
    launch: float         # seconds of fixed cost per extra kernel
    gather_element: float          # seconds per element of an index-gathering pointwise kernel


CPU = DeviceModel("cpu", {torch.float32: 2.5e11, torch.bfloat16: 1.5e12, torch.float16: 1.0e11,
                          torch.float64: 1.2e11}, 1.5e10, 3e-6, 1.2e-9)
CUDA = DeviceModel("cuda", {torch.float32: 5.0e13, torch.bfloat16: 6.0e14, torch.float16: 6.0e14,
                            torch.float64: 5.0e13}, 3.0e12, 4e-6, 1.0e-12)


def device_model(device: torch.device) -> DeviceModel:
    return CUDA if device.type == "cuda" else CPU


def _gemm(dev: DeviceModel, M: int, K: int, N: int, dtype: torch.dtype, eff: float = 1.0) -> float:
    elt = torch.finfo(dtype).bits // 8
    flops = 2.0 * M * K * N
    bytes_ = (M * K + K * N + M * N) * elt
    return max(flops / dev.peak.get(dtype, dev.peak[torch.float32]), bytes_ / dev.bandwidth) / eff + dev.launch


def _pointwise(dev: DeviceModel, elements: int, dtype: torch.dtype, passes: int = 3) -> float:
    elt = torch.finfo(dtype).bits // 8
    return elements * elt * passes / dev.bandwidth + dev.launch


def _gather(dev: DeviceModel, elements: int, dtype: torch.dtype) -> float:
    """A pointwise kernel whose loads go through an index tensor."""
    return max(elements * dev.gather_element, _pointwise(dev, elements, dtype) - dev.launch) + dev.launch


@dataclass
class Estimate:
    original: float
    rewritten: float

    @property
    def ratio(self) -> float:
        """Estimated speedup: original / rewritten."""
        return self.original / self.rewritten if self.rewritten > 0 else float("inf")

    @property
    def pays(self) -> bool:
        return self.rewritten <= (1.0 - MARGIN) * self.original

    def reason(self, what: str, dev: DeviceModel, M: int) -> str:
        return (f"cost model: {what} estimated at {self.ratio:.2f}x of the original on {dev.name} "
                f"at {M} tokens (needs >= {1 / (1 - MARGIN):.2f}x)")


def pifa(M: int, d_in: int, r: int, d_out: int, dtype: torch.dtype, device: torch.device,
         restore_order: bool = True) -> Estimate:
    """``restore_order=False``: the next chain takes the column order, no gather pass."""
    dev = device_model(device)
    orig = _gemm(dev, M, d_in, r, dtype) + _gemm(dev, M, r, d_out, dtype)
    new = _gemm(dev, M, d_in, r, dtype) + _gemm(dev, M, r, d_out - r, dtype)
    if restore_order:      # otherwise the concatenation fuses into the consumer's element-wise op
        new += _gather(dev, M * d_out, dtype)
    return Estimate(orig, new)


def bd_linear(M: int, d_in: int, d_out: int, heads: int, g: int, tables: int, dtype: torch.dtype,
              device: torch.device) -> Estimate:
    """``bdpass::bd_linear`` with ``heads`` x ``g`` BD columns and ``tables`` pivot tables
    against the dense projection. On a GPU the kernel reads the rest rows through the table
    and starts its accumulator at the identity term; on a CPU each table gathers its rest
    rows once, the identity term is one pass over the BD columns, and each table's heads are
    GEMMs of their own."""
    dev = device_model(device)
    n_bd = heads * g
    K = d_in - g
    orig = _gemm(dev, M, d_in, d_out, dtype)
    new = _gemm(dev, M, d_in, d_out - n_bd, dtype) if d_out > n_bd else 0.0
    if device.type == "cuda":
        return Estimate(orig, new + _gemm(dev, M, K, n_bd, dtype))
    per_table = heads // max(tables, 1)
    new += tables * (_gemm(dev, M, K, per_table * g, dtype) + _gather(dev, M * d_in, dtype))
    new += _pointwise(dev, M * n_bd, dtype, passes=2)
    return Estimate(orig, new)


# ---------------------------------------------------------------------------- plausible speedups
def pifa_ideal(M: int, d_in: int, r: int, d_out: int) -> float:
    """The largest speedup PIFA's saved work allows: the pair's FLOP ratio or its ratio of
    elements moved (inputs, weights, the rank-``r`` intermediate written and read, the output),
    whichever is larger. The rewrite's optional gather pass is not counted (a lower bound of
    its work makes a higher bound of the speedup)."""
    f_o = d_in * r + r * d_out
    f_n = d_in * r + r * (d_out - r)
    b_o = M * d_in + d_in * r + r * d_out + 2 * M * r + M * d_out
    b_n = M * d_in + d_in * r + r * (d_out - r) + 2 * M * r + M * d_out
    return max(f_o / max(f_n, 1), b_o / max(b_n, 1))


def bd_ideal(M: int, d_in: int, d_out: int, blocks) -> float:
    """The largest speedup a ``bd_linear`` lowering allows against the dense projection:
    ``blocks`` lists each block's (identity rows g, columns n) (g = 0 for a dense block); a
    BD block multiplies only ``d_in - g`` rows. FLOP ratio or ratio of elements moved (``x``,
    the weights, the output; gathers and the identity term are not counted), whichever is
    larger."""
    n_blocks = sum(int(n) for _, n in blocks)
    rest = max(d_out - n_blocks, 0)              # columns no block lists (none in practice)
    f_o = d_in * d_out
    f_n = sum((d_in - int(g)) * int(n) for g, n in blocks) + d_in * rest
    b_o = M * d_in + d_in * d_out + M * d_out
    b_n = M * d_in + f_n + M * d_out
    return max(f_o / max(f_n, 1), b_o / max(b_n, 1))
