"""How a bd/Inductor pair is timed: CUDA-graph replays over enough input copies to
defeat the L2 cache, ``triton.testing.do_bench`` medians, the two sides interleaved over
``--rounds`` rounds (``time.perf_counter`` and plain calls in the dry run)."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable


class Timing:
    """Part of :class:`gpu_suite.Suite` (see the package docstring for what it uses)."""

    def _copies(self, bytes_per_call: int) -> int:
        """Calls per timed replay, each on its own inputs/weights, so that together they
        exceed the L2 cache three times over (at most 64)."""
        if self.dry:
            return 2
        l2 = (self.data.get("device_properties") or {}).get("l2_cache_bytes") or 50 * 2 ** 20
        return int(min(64, max(1, math.ceil(3 * l2 / max(bytes_per_call, 1)))))

    def _prepare(self, fn: Callable, arg_sets: list) -> tuple[Callable, str]:
        """A callable running ``fn`` once per argument set: a CUDA graph replay on the GPU
        (no launch overhead in the timing), plain calls in the dry run."""
        torch = self.torch
        for a in arg_sets:                    # compile, autotune, warm up
            fn(*a)
        for a in arg_sets:
            fn(*a)
        self.sync()
        if self.dry:
            return (lambda: [fn(*a) for a in arg_sets]), "plain calls"
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for a in arg_sets:
                    fn(*a)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                keep = [fn(*a) for a in arg_sets]
            g.replay()
            self.sync()

            def replay(g=g, keep=keep):
                g.replay()
            return replay, "cuda graph"
        except Exception as e:
            self.sync()
            return (lambda: [fn(*a) for a in arg_sets]), f"plain calls (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]})"

    def _time(self, run: Callable) -> float:
        if self.dry:
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts) * 1e3
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                             return_mode="median"))

    def time_pair(self, f_ind: Callable, sets_ind: list, f_bd: Callable, sets_bd: list) -> dict:
        """Medians (ms per call) of the two, interleaved over ``--rounds`` rounds."""
        t = time.monotonic()
        run_i, how_i = self._prepare(f_ind, sets_ind)
        compile_i = time.monotonic() - t
        t = time.monotonic()
        run_b, how_b = self._prepare(f_bd, sets_bd)
        compile_b = time.monotonic() - t
        ti, tb = [], []
        for _ in range(min(self.args.rounds, 2) if self.dry else self.args.rounds):
            ti.append(self._time(run_i) / len(sets_ind))
            tb.append(self._time(run_b) / len(sets_bd))
        mi, mb = statistics.median(ti), statistics.median(tb)
        return {"ms_inductor": mi, "ms_bd": mb, "ratio_vs_inductor": mi / mb if mb > 0 else math.inf,
                "rounds_ms_inductor": ti, "rounds_ms_bd": tb, "calls_per_replay": len(sets_bd),
                "timing": how_b if how_b == how_i else f"inductor: {how_i}; bd: {how_b}",
                "warmup_s_inductor": round(compile_i, 2), "warmup_s_bd": round(compile_b, 2)}
