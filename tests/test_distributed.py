"""bd under tensor parallelism with torch.distributed (CPU, gloo).

Two sharding styles, each rank compiling its own module with ``backend="bd"``:

* **manual sharding with functional collectives** (gpt-fast style, ``tests/dist_models.py``):
  each rank holds plain tensors, its slices of the full weights, and its forward all-reduces
  the partial sums of every row-parallel projection with
  ``torch.distributed._functional_collectives`` inside the compiled graph. Each rank gets the
  rewrites of its own heads and chains; its output (after the all-reduce) equals the
  unsharded model's; it holds only its share of the factors.
* **DTensor** ``parallelize_module`` with ``ColwiseParallel``/``RowwiseParallel``: the Dynamo
  graph computes on DTensors, which bd does not rewrite. The verdicts say so, the outputs
  stay right; the supported path is preparing before sharding (docs/serving.md).

Collectives between a projection and its partner are never passed through: verdicts with
their reasons are asserted (an all-reduce of partial sums, an all-gather along channels).

Every multi-process test spawns its ranks with ``torch.multiprocessing`` (spawn), on a free
port, bounded in time (the ranks are killed at the deadline); each rank writes its results
as JSON and the assertions run here. One spawn runs several models (process start and
``import torch`` dominate on small models). The 4-rank sweep is ``@pytest.mark.slow``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist

import dist_models as dm

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

OPTIONS = {"cost_model": False}      # every legal rewrite (the cost model is tested on its own)
HIDDEN = 64


# ============================================================================ harness
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, program: str, world: int, port: int, outdir: str, kwargs: dict) -> None:
    """A rank's process: join the group, run ``program``, write its result, leave."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=kwargs.pop("pg_timeout", 60)))
    try:
        from torch._dynamo.backends.registry import register_backend

        import bdpass

        if "bd" not in torch._dynamo.list_backends(exclude_tags=()):
            register_backend(name="bd")(bdpass.bd_backend)
        try:
            result = globals()[program](rank, world, **kwargs)
        except Exception:
            result = {"error": traceback.format_exc()}
        with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(program: str, world: int, timeout: float = 150.0, **kwargs) -> list[dict]:
    """Run ``program(rank, world, **kwargs)`` on ``world`` spawned ranks; their results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bdpass-dist-") as outdir:
        ctx = mp.start_processes(_entry, args=(program, world, free_port(), outdir, kwargs), nprocs=world,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    pytest.fail(f"{program} on {world} ranks did not finish within {timeout:.0f} s")
        finally:
            for p in ctx.processes:           # only the processes this call started
                if p.is_alive():
                    p.kill()
                    p.join(5)
        results = []
        for r in range(world):
            with open(os.path.join(outdir, f"{r}.json")) as f:
                results.append(json.load(f))
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return results


# ============================================================================ rank programs
def _example(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 6, HIDDEN)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _summary(rep, out: torch.Tensor, ref: torch.Tensor, eager: torch.Tensor | None) -> dict:
    return {
        "err": _rel(out, ref),
        "eager_err": _rel(eager, ref) if eager is not None else None,
        "rewrites": [{"kind": r.kind, "site": r.site, "params_before": r.params_before,
                      "params_after": r.params_after, **{k: r.details.get(k) for k in
                                                         ("heads", "d_h", "d_in", "projection", "folded_into",
                                                          "r", "d_out", "column_order", "weights")}}
                     for r in rep.rewrites],
        "skipped": [{"kind": s.kind, "site": s.site, "reason": s.reason} for s in rep.skipped],
        "validation": [g.validation for g in rep.graphs],
        "fallback": [g.fallback for g in rep.graphs],
        "derived_bytes": rep.derived_bytes,
        "released_bytes": sum(g.released_bytes for g in rep.graphs),
        "targets_after": sorted({n.target for g in rep.graphs for n in g.nodes_after}),
    }


def funcol_program(rank: int, world: int, names: list[str], lowering: str = "aot_eager",
                   release: bool = False, unsharded: bool = True) -> dict:
    """Shard each model by hand, compile this rank's module with bd, run it; on rank 0 also
    compile the unsharded model (no collectives) for the factor shares."""
    import bdpass

    group = dist.group.WORLD
    out: dict = {}
    for name in names:
        full = dm.build(name)
        x = _example()
        with torch.no_grad():
            ref = copy.deepcopy(full).double()(x.double())
            local = dm.shard(full, rank, world, group)
            res: dict = {"local_param_bytes": sum(p.numel() * p.element_size() for p in local.parameters()),
                         "full_param_bytes": sum(p.numel() * p.element_size() for p in full.parameters())}
            eager = local(x)
            torch._dynamo.reset()
            opts = {**OPTIONS, "lowering": lowering, "release_weights": release}
            with bdpass.collect_reports() as rep:
                y = torch.compile(local, backend="bd", options=opts)(x)
            res.update(_summary(rep, y, ref, eager))
            if unsharded and rank == 0 and name in ("mla", "gqa", "lowrank"):
                torch._dynamo.reset()
                with bdpass.collect_reports() as rep1:
                    y1 = torch.compile(copy.deepcopy(full), backend="bd", options=opts)(x)
                res["unsharded"] = _summary(rep1, y1, ref, None)
            torch._dynamo.reset()
        out[name] = res
    return out


def dtensor_program(rank: int, world: int, names: list[str], lowering: str = "aot_eager") -> dict:
    """``parallelize_module`` each model (ColwiseParallel/RowwiseParallel), compile it with bd."""
    import bdpass
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (world,))
    out: dict = {}
    for name in names:
        full = dm.build(name)
        x = _example()
        with torch.no_grad():
            ref = copy.deepcopy(full).double()(x.double())
            model = parallelize_module(full, mesh, dm.dtensor_plan(name))
            torch._dynamo.reset()
            with bdpass.collect_reports() as rep:
                y = torch.compile(model, backend="bd", options={**OPTIONS, "lowering": lowering})(x)
            torch._dynamo.reset()
        out[name] = _summary(rep, y, ref, None)
    return out


# ============================================================================ assertions
SEND = "sent to the other ranks by"
BASIS = "a rank cannot fold its partner with another rank's basis"


def _kinds(res: dict) -> dict:
    k: dict = {}
    for r in res["rewrites"]:
        k[r["kind"]] = k.get(r["kind"], 0) + 1
    return k


def _by_kind(res: dict, kind: str) -> list[dict]:
    return [r for r in res["rewrites"] if r["kind"] == kind]


def check_close(res: dict) -> None:
    """The rank's output (after its all-reduces) equals the unsharded model's up to rounding:
    within the project's 1.5x of the original's (here the sharded eager run's) error against
    float64, and the rewritten graph, collectives included, matched the original in float64."""
    assert res["err"] <= 1.5 * res["eager_err"], (res["err"], res["eager_err"])
    assert all(v is not None and v.startswith("passed") for v in res["validation"]), res["validation"]


def check_mla(results: list[dict], world: int) -> None:
    H, nope, v, latent = 4, 16, 16, 32
    for rank, rr in enumerate(results):
        res = rr["mla"]
        check_close(res)
        assert _kinds(res) == {"bd_qk": 1, "bd_vo": 1}, res
        qk, vo = _by_kind(res, "bd_qk")[0], _by_kind(res, "bd_vo")[0]
        for r, d_h in ((qk, nope), (vo, v)):
            assert r["projection"] == "kv_b_proj.weight"
            assert r["heads"] == H // world and r["d_h"] == d_h and r["d_in"] == latent, r
            assert r["params_before"] == H // world * latent * d_h
            assert r["params_after"] == H // world * (latent - d_h) * d_h
        assert qk["folded_into"] == ["q_proj.weight"] and vo["folded_into"] == ["o_proj.weight"], (qk, vo)
        assert res["skipped"] == [], res["skipped"]
        # the collective stays in the rewritten graph, after the rewritten projections
        assert any("all_reduce" in t for t in res["targets_after"]), res["targets_after"]
        assert any("bd_linear" in t for t in res["targets_after"]), res["targets_after"]


def check_gqa(results: list[dict], world: int) -> None:
    kvh, hd, hidden = 4, 16, HIDDEN
    for rank, rr in enumerate(results):
        res = rr["gqa"]
        check_close(res)
        assert _kinds(res) == {"bd_vo": 1}, res
        vo = _by_kind(res, "bd_vo")[0]
        assert vo["projection"] == "v_proj.weight" and vo["folded_into"] == ["o_proj.weight"], vo
        assert vo["heads"] == kvh // world and vo["d_h"] == hd and vo["d_in"] == hidden, vo
        assert [(s["kind"], s["reason"]) for s in res["skipped"]] == [("bd_qk", "RoPE on q/k channels")], res


def check_lowrank(results: list[dict], world: int) -> None:
    d, ffn, r = HIDDEN, 128, 32
    rl = r // world
    for rank, rr in enumerate(results):
        res = rr["lowrank"]
        check_close(res)
        assert _kinds(res) == {"pifa": 2}, res
        up, down = sorted(_by_kind(res, "pifa"), key=lambda c: c["d_in"])
        for c, d_in, d_out in ((up, d, ffn), (down, ffn, d)):
            assert (c["d_in"], c["r"], c["d_out"]) == (d_in, rl, d_out), c
            assert c["params_before"] == d_in * rl + rl * d_out and c["params_after"] == d_in * rl + rl * (d_out - rl)
            # the all-reduce sums terms whose pivots differ per rank: the column order must be
            # restored on each rank, never handed to the next chain across the collective
            assert c["column_order"] == "restored", c
        assert up["weights"] == ["v_up.weight", "u_up.weight"] and down["weights"] == ["v_down.weight",
                                                                                        "u_down.weight"]


def check_shares(results: list[dict], world: int) -> None:
    """Each rank holds only its share: with release_weights, the replaced weights are freed
    and the factors a rank holds are those of its heads (BD: exactly 1/world of the unsharded
    model's, heads being independent) or of its local chains (PIFA: counted per rank above)."""
    for name in ("mla", "gqa"):
        full = results[0][name]["unsharded"]
        assert full["derived_bytes"] > 0 and full["released_bytes"] > 0, full
        for rank, rr in enumerate(results):
            res = rr[name]
            assert res["derived_bytes"] * world == full["derived_bytes"], (name, rank, res["derived_bytes"],
                                                                           full["derived_bytes"])
            assert res["released_bytes"] * world == full["released_bytes"], (name, rank)
    for rank, rr in enumerate(results):
        res = rr["lowrank"]
        after = sum(c["params_after"] for c in res["rewrites"]) * 4
        assert after <= res["derived_bytes"] < after + 4 * 1024, (res["derived_bytes"], after)  # + pivot tables
        assert res["released_bytes"] == sum(c["params_before"] for c in res["rewrites"]) * 4


def check_collectives_between(results: list[dict], world: int) -> None:
    """A collective between a projection and its partner: an all-reduce of partial sums (K
    row-parallel) and an all-gather along channels (K/V column-parallel by heads, attention
    replicated). Both refuse the pair on every rank with the collective named."""
    for rank, rr in enumerate(results):
        res = rr["row_keys"]
        check_close(res)
        assert _kinds(res) == {"bd_vo": 1}, res               # V and O stay on the rank: rewritten
        (sk,) = [s for s in res["skipped"] if s["kind"] == "bd_qk"]
        assert sk["reason"].startswith("_c10d_functional.all_reduce (sum) between projection and contraction: "
                                       "a sum over ranks of terms computed with each rank's own weights"), sk
        assert BASIS in sk["reason"]

        res = rr["gathered"]
        assert res["rewrites"] == [], res
        reasons = {s["kind"]: s["reason"] for s in res["skipped"]}
        assert set(reasons) == {"bd_qk", "bd_vo"}, res["skipped"]
        for kind in ("bd_qk", "bd_vo"):
            assert reasons[kind].startswith("_c10d_functional.all_gather_into_tensor between projection and "
                                            "contraction: channels gathered from every rank"), reasons[kind]
            assert BASIS in reasons[kind]
        assert res["err"] <= 1.5 * res["eager_err"], res


def check_dtensor(results: list[dict]) -> None:
    for rank, rr in enumerate(results):
        for name in ("mla", "gqa", "lowrank"):
            res = rr[name]
            assert res["err"] < 1e-5, (name, res["err"])      # eager DTensor ~1e-7: nothing was rewritten
            assert res["rewrites"] == [], (name, res["rewrites"])
            assert all(f is None for f in res["fallback"]), res["fallback"]
        for name in ("mla", "gqa"):
            reasons = {(s["kind"], s["reason"]) for s in rr[name]["skipped"]}
            assert {k for k, _ in reasons} == {"bd_qk", "bd_vo"}, reasons
            assert all(r.startswith("DTensor placement change (DTensor.") and "prepare the model before sharding"
                       in r for _, r in reasons), reasons


# ============================================================================ analysis of collectives
# Hand-built graphs (no process group needed): what the channel-layout analysis does with each
# collective, and the local stand-ins of collectives for checks that rerun a graph.
class GraphBuilder:
    def __init__(self):
        self.g = torch.fx.Graph()
        self.inputs: list = []
        self.params: dict = {}

    def input(self, name: str, *shape: int, param: bool = False):
        n = self.g.placeholder(name)
        t = torch.randn(*shape)
        n.meta["val"] = t
        if param:
            t = torch.nn.Parameter(t)
            from bdpass.graph.params import ParamInfo

            self.params[n] = ParamInfo(index=len(self.inputs), node=n, name=name, tensor=t)
        self.inputs.append(t)
        return n

    def call(self, target, *args, val=None, method: bool = False, **kwargs):
        n = (self.g.call_method if method else self.g.call_function)(target, tuple(args), kwargs)
        n.meta["val"] = val
        return n

    def analyze(self, *outputs):
        from bdpass.graph import layout
        from bdpass.graph.linears import find_linears

        self.g.output(tuple(outputs))
        gm = torch.fx.GraphModule(torch.nn.Module(), self.g)
        sites = find_linears(gm, self.params)
        a = layout._Analysis(gm, sites, self.inputs)
        return a, a.run(), sites


def _t(*shape):
    return torch.empty(*shape)


F_ = torch.nn.functional
C10D = getattr(torch.ops, "_c10d_functional", None)


def _projection(b: GraphBuilder, d_out: int = 32):
    x = b.input("x", 2, 6, HIDDEN)
    w = b.input("w", d_out, HIDDEN, param=True)
    return x, b.call(F_.linear, x, w, val=_t(2, 6, d_out))


def test_layout_all_gather_along_channels_is_a_concatenation():
    """all_gather_into_tensor concatenates every rank's tensor along dim 0: with channels on
    dim 0 the layout is concatenated too (here [32 tracked-then-touched, 8 untracked] twice),
    every block touched (the others are other ranks' channels); wait_tensor passes it on; what
    this rank sent escapes."""
    b = GraphBuilder()
    x, k = _projection(b)
    other = b.input("cache", 2, 6, 8)                                     # not from a linear
    kc = b.call(torch.cat, (k, other), val=_t(2, 6, 40), dim=-1)
    kt = b.call(torch.permute, kc, (2, 0, 1), val=_t(40, 2, 6))
    ag = b.call(C10D.all_gather_into_tensor, kt, 2, "0", val=_t(80, 2, 6))
    wt = b.call(C10D.wait_tensor, ag, val=_t(80, 2, 6))
    a, res, sites = b.analyze(wt)
    idx = a.L[ag].idx
    assert idx.shape == (80, 1, 1)
    flat = idx.reshape(-1)
    assert (flat[:32] <= -2).all() and (flat[32:40] == -1).all() and (flat[40:72] <= -2).all() \
        and (flat[72:] == -1).all(), flat
    code = int(flat[0])
    assert res.reason_of(code).startswith("_c10d_functional.all_gather_into_tensor between projection and "
                                          "contraction: channels gathered from every rank")
    assert res.reason_sources[-2 - code] == frozenset({0})
    assert (a.L[wt].idx == idx).all()                                      # wait: the same value
    assert set(res.escapes[0]) == set(range(32))
    assert all(r.startswith("sent to the other ranks by _c10d_functional.all_gather_into_tensor:")
               for r in res.escapes[0].values())


@pytest.mark.parametrize("op", ["sum", "avg", "max"])
def test_layout_all_reduce_touches_in_place(op):
    """An all-reduce keeps the layout's shape (a sum over ranks of tensors of this layout),
    every tracked channel touched by it, the reduce op named; untracked channels stay so."""
    b = GraphBuilder()
    x, k = _projection(b)
    other = b.input("cache", 2, 6, 8)
    kc = b.call(torch.cat, (other, k), val=_t(2, 6, 40), dim=-1)
    ar = b.call(C10D.all_reduce, kc, op, "0", val=_t(2, 6, 40))
    wt = b.call(C10D.wait_tensor, ar, val=_t(2, 6, 40))
    a, res, _ = b.analyze(wt)
    idx = a.L[wt].idx.reshape(-1)
    assert a.L[wt].idx.shape == (1, 1, 40)
    assert (idx[:8] == -1).all() and (idx[8:] <= -2).all()
    assert res.reason_of(int(idx[8])).startswith(f"_c10d_functional.all_reduce ({op}) between projection and "
                                                 f"contraction: a sum over ranks")
    assert all(r.startswith(f"sent to the other ranks by _c10d_functional.all_reduce ({op})")
               for r in res.escapes[0].values())


def test_layout_reduce_scatter_all_to_all_and_dims_without_channels():
    """A reduce-scatter or all-to-all along a channel dim exchanges blocks of channels between
    ranks: one touched code over the dim; along a dim without channels (tokens) the layout
    keeps its channels, touched."""
    b = GraphBuilder()
    x, k = _projection(b)
    kt = b.call(torch.permute, k, (2, 0, 1), val=_t(32, 2, 6))
    rs = b.call(C10D.reduce_scatter_tensor, kt, "sum", 2, "0", val=_t(16, 2, 6))
    aa = b.call(C10D.all_to_all_single, kt, [16, 16], [16, 16], "0", val=_t(32, 2, 6))
    rs_tokens = b.call(C10D.reduce_scatter_tensor, k, "sum", 2, "0", val=_t(1, 6, 32))
    a, res, _ = b.analyze(rs, aa, rs_tokens)
    for n, what in ((rs, "reduce_scatter_tensor (sum)"), (aa, "all_to_all_single")):
        idx = a.L[n].idx
        assert idx.shape == (1, 1, 1) and int(idx.reshape(-1)[0]) <= -2, (n, idx.shape)
        assert res.reason_of(int(idx.reshape(-1)[0])).startswith(f"_c10d_functional.{what} between projection")
    idx = a.L[rs_tokens].idx
    assert idx.shape == (1, 1, 32) and (idx <= -2).all()


def test_layout_coalesced_inplace_and_legacy_collectives():
    b = GraphBuilder()
    x, k = _projection(b)
    k2 = b.call(torch.mul, k, 2.0, val=_t(2, 6, 32))
    co = b.call(C10D.all_reduce_coalesced, [k, x], "sum", "0", val=[_t(2, 6, 32), _t(2, 6, HIDDEN)])
    g0 = b.call(__import__("operator").getitem, co, 0, val=_t(2, 6, 32))
    g1 = b.call(__import__("operator").getitem, co, 1, val=_t(2, 6, HIDDEN))
    ip = b.call(torch.ops._c10d_functional.all_reduce_, k2, "sum", "0", val=_t(2, 6, 32))
    after = b.call(torch.mul, k2, 1.0, val=_t(2, 6, 32))       # reads the tensor all_reduce_ wrote
    a, res, _ = b.analyze(g0, g1, ip, after)
    assert (a.L[g0].idx <= -2).all() and a.L[g1] is None
    assert (a.L[ip].idx <= -2).all() and (a.L[after].idx <= -2).all()
    assert "all_reduce_ (sum)" in res.reason_of(int(a.L[after].idx.reshape(-1)[0]))
    legacy = getattr(torch.ops, "c10d_functional", None)
    if legacy is not None and hasattr(legacy, "all_reduce"):
        from bdpass.graph.ops import collective

        b2 = GraphBuilder()
        x2, k3 = _projection(b2)
        n = b2.call(legacy.all_reduce, k3, "max", "", [0, 1], 2, val=_t(2, 6, 32))
        assert collective(n).kind == "all_reduce" and collective(n).reduce_op == "max"


def test_collective_classification():
    """Ops, overloads, the funcol Python wrappers and DTensor calls are recognised; ordinary ops
    are not."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import DTensor

    from bdpass.graph.ops import collective

    b = GraphBuilder()
    x, k = _projection(b)
    cases = [
        (b.call(C10D.all_reduce.default, k, "sum", "0", val=_t(2, 6, 32)), ("all_reduce", "sum", None)),
        (b.call(C10D.wait_tensor.default, k, val=_t(2, 6, 32)), ("wait", None, None)),
        (b.call(funcol.all_gather_tensor, k, -1, None, val=_t(2, 6, 64)), ("all_gather", None, -1)),
        (b.call(funcol.reduce_scatter_tensor, k, "avg", 2, None, val=_t(2, 6, 16)), ("reduce_scatter", "avg", 2)),
        (b.call(funcol.all_reduce, k, "sum", None, val=_t(2, 6, 32)), ("all_reduce", "sum", None)),
        (b.call(dist.all_reduce, k, val=None), ("all_reduce", "sum", None)),
        (b.call(DTensor.from_local, k, None, val=_t(2, 6, 32)), ("dtensor", None, None)),
        (b.call("to_local", k, method=True, val=_t(2, 6, 32)), ("dtensor", None, None)),
        (b.call("redistribute", k, method=True, val=_t(2, 6, 32)), ("dtensor", None, None)),
    ]
    for node, (kind, op, dim) in cases:
        c = collective(node)
        assert c is not None and (c.kind, c.reduce_op, c.dim) == (kind, op, dim), (node.target, c)
    assert collective(k) is None
    assert collective(b.call("to", k, torch.float64, method=True, val=_t(2, 6, 32))) is None
    # torch.distributed's in-place API: what it is given is sent and overwritten
    ip = cases[5][0]
    a, res, _ = b.analyze(ip)
    assert collective(ip).inplace and (a.L[k].idx <= -2).all()


def test_dtensor_boundary_is_touched_with_advice():
    b = GraphBuilder()
    x, k = _projection(b)
    r = b.call("redistribute", k, method=True, val=_t(2, 6, 32))
    tl = b.call("to_local", r, method=True, val=_t(2, 6, 16))
    a, res, _ = b.analyze(tl)
    code = int(a.L[tl].idx.reshape(-1)[0])
    assert res.reason_of(code).startswith("DTensor placement change (DTensor.to_local)")
    assert "prepare the model before sharding it" in res.reason_of(code)
    from bdpass.graph.params import weight_problem
    from bdpass.graph.params import ParamInfo

    dt_param = type("FakeDTensor", (), {})      # weight_problem on a real DTensor: see the rank programs
    assert weight_problem([]) is None and dt_param is not None


def test_collective_stand_ins():
    """Local values of a collective's shape: what a check that reruns a graph on one rank can
    use instead of communicating."""
    from bdpass.graph.ops import collective_stand_in

    b = GraphBuilder()
    x, k = _projection(b)
    kt = b.call(torch.permute, k, (2, 0, 1), val=_t(32, 2, 6))
    t = torch.randn(32, 2, 6)
    cases = [
        (b.call(C10D.all_reduce, kt, "sum", "0", val=_t(32, 2, 6)), (32, 2, 6)),
        (b.call(C10D.all_gather_into_tensor, kt, 4, "0", val=_t(128, 2, 6)), (128, 2, 6)),
        (b.call(C10D.reduce_scatter_tensor, kt, "sum", 4, "0", val=_t(8, 2, 6)), (8, 2, 6)),
        (b.call(C10D.all_to_all_single, kt, [16, 16], [16, 16], "0", val=_t(32, 2, 6)), (32, 2, 6)),
        (b.call(C10D.wait_tensor, kt, val=_t(32, 2, 6)), (32, 2, 6)),
    ]
    for node, shape in cases:
        out = collective_stand_in(node, (t, *node.args[1:]), {})
        assert tuple(out.shape) == shape, (node.target, out.shape)
    assert torch.equal(collective_stand_in(cases[1][0], (t, 4, "0"), {})[32:64], t)
    assert torch.equal(collective_stand_in(cases[2][0], (t, "sum", 4, "0"), {}), t[:8])
    co = b.call(C10D.all_reduce_coalesced, [kt, kt], "sum", "0", val=[_t(32, 2, 6)] * 2)
    assert [tuple(v.shape) for v in collective_stand_in(co, ([t, t], "sum", "0"), {})] == [(32, 2, 6)] * 2
    for bad in (b.call("to_local", kt, method=True, val=_t(32, 2, 6)), b.call(dist.all_reduce, kt, val=None)):
        with pytest.raises(NotImplementedError):
            collective_stand_in(bad, (t,), {})


# ============================================================================ CI tests
FUNCOL_MODELS = ["mla", "gqa", "lowrank", "row_keys", "gathered"]


@pytest.fixture(scope="module")
def funcol2():
    return run_ranks("funcol_program", 2, names=FUNCOL_MODELS, release=True)


def test_funcol_mla_heads_split(funcol2):
    check_mla(funcol2, 2)


def test_funcol_gqa_kv_heads_split(funcol2):
    check_gqa(funcol2, 2)


def test_funcol_lowrank_rank_split(funcol2):
    check_lowrank(funcol2, 2)


def test_funcol_each_rank_holds_its_share(funcol2):
    check_shares(funcol2, 2)


def test_funcol_collective_between_projection_and_contraction(funcol2):
    check_collectives_between(funcol2, 2)


def test_funcol_inductor_mla():
    """The rewritten graph with its all-reduce lowered by Inductor (C++ on CPU)."""
    res = run_ranks("funcol_program", 2, names=["mla"], lowering="inductor", unsharded=False)
    check_mla(res, 2)


def test_dtensor_parallelize_module():
    check_dtensor(run_ranks("dtensor_program", 2, names=["mla", "gqa", "lowrank"]))


# ============================================================================ slow sweep
@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["aot_eager", "inductor"])
def test_funcol_4_ranks(lowering):
    res = run_ranks("funcol_program", 4, timeout=600, names=FUNCOL_MODELS, lowering=lowering, release=True)
    check_mla(res, 4)
    check_gqa(res, 4)
    check_lowrank(res, 4)
    check_shares(res, 4)
    check_collectives_between(res, 4)


@pytest.mark.slow
def test_dtensor_4_ranks():
    check_dtensor(run_ranks("dtensor_program", 4, timeout=600, names=["mla", "gqa", "lowrank"]))
