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

Ranks decide on their own: the checks that rerun a graph (validation) use local stand-ins of
the collectives and never communicate, so a rank that rewrites (or validates units alone)
where another does not still pairs its real collectives with the other's
(``test_ranks_that_decide_differently``).

**Prepared, then sharded** (``bdpass.shard``): each model is prepared once unsharded and
saved as one safetensors checkpoint; every rank loads its heads' BD factors and its slice of
the PIFA pivots from that file into its local module.

Every multi-process test spawns its ranks with ``torch.multiprocessing`` (spawn), on a free
port, bounded in time (the ranks are killed at the deadline); each rank writes its results
as JSON and the assertions run here. One spawn runs several models (process start and
``import torch`` dominate on small models). One small 4-rank run (both styles) is in the
default set; the full 4-rank sweep is ``@pytest.mark.slow``.
"""
from __future__ import annotations

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


def degenerate_values(full: torch.nn.Module, world: int) -> None:
    """Make the V projection of every KV head of the last rank rank-deficient (the second
    half of a head's channels repeats the first), so BD-VO is illegal there and legal on the
    other ranks."""
    hd, kvh = full.hd, full.k_proj.weight.shape[0] // full.hd
    with torch.no_grad():
        w = full.v_proj.weight
        for h in range(kvh - kvh // world, kvh):
            rows = w[h * hd:(h + 1) * hd]
            rows[hd // 2:] = rows[: hd // 2]


def divergent_program(rank: int, world: int, lowering: str = "aot_eager") -> dict:
    """Ranks that decide differently, each compiling its own module (its checks must never
    communicate, or they would pair with another rank's real collectives):

    * ``gqa``: the last rank's V weights make BD-VO illegal there; the other ranks rewrite;
    * ``mla``: the last rank compiles with BD turned off;
    * ``lowrank``: rank 0's PIFA factors are wrong (a broken rewrite), so rank 0's validation
      fails, tries each chain alone and refuses them; the other ranks' validation passes."""
    import bdpass
    from bdpass.rewrites import pifa as pifa_rw

    group = dist.group.WORLD
    last = rank == world - 1
    out: dict = {}
    for name in ("gqa", "mla", "lowrank"):
        full = dm.build(name)
        if name == "gqa":
            degenerate_values(full, world)
        opts = {**OPTIONS, "lowering": lowering}
        if name == "mla" and last:
            opts.update(bd_qk=False, bd_vo=False)
        real = pifa_rw._derived
        if name == "lowrank" and rank == 0:
            def derived(f, *a):
                o = real(f, *a)
                o[0] = o[0] * 1.01
                return o
            pifa_rw._derived = derived
        x = _example()
        try:
            with torch.no_grad():
                ref = copy.deepcopy(full).double()(x.double())
                local = dm.shard(full, rank, world, group)
                eager = local(x)
                torch._dynamo.reset()
                with bdpass.collect_reports() as rep:
                    y = torch.compile(local, backend="bd", options=opts)(x)
                torch._dynamo.reset()
        finally:
            pifa_rw._derived = real
        out[name] = _summary(rep, y, ref, eager)
    return out


def styles_program(rank: int, world: int, funcol: list[str], dtensor: list[str]) -> dict:
    """Both sharding styles in one spawn (process start and ``import torch`` dominate)."""
    return {"funcol": funcol_program(rank, world, funcol, unsharded=False),
            "dtensor": dtensor_program(rank, world, dtensor)}


PREPARED_MODELS = ["mla", "gqa", "lowrank"]


def prepare_checkpoints(outdir: str) -> None:
    """Prepare each unsharded model once and save it (one safetensors file per model), with
    the prepared model's outputs in float32 and float64 for the ranks to compare against."""
    import bdpass
    from safetensors.torch import save_file

    refs = {}
    x = _example()
    for name in PREPARED_MODELS:
        full = dm.build(name)
        with torch.no_grad():
            prep = bdpass.prepare(copy.deepcopy(full), x, options=OPTIONS, inplace=False)
            bdpass.save_prepared(prep, os.path.join(outdir, f"{name}.safetensors"))
            refs[f"{name}.prepared"] = prep(x)
            refs[f"{name}.prepared64"] = copy.deepcopy(prep).double()(x.double())
        torch._dynamo.reset()
    save_file(refs, os.path.join(outdir, "refs.safetensors"))


def prepared_program(rank: int, world: int, outdir: str, lowering: str = "aot_eager") -> dict:
    """Load this rank's share of each prepared checkpoint into the rank's module (local
    sizes, all-reduce after the row-parallel projections), run it in float32, in float64
    (the loaded factors widened) and compiled with bd."""
    import bdpass
    from bdpass.prepare.modules import PREPARED_TYPES
    from bdpass.shard import load_sharded
    from safetensors.torch import load_file

    group = dist.group.WORLD
    refs = load_file(os.path.join(outdir, "refs.safetensors"))
    x = _example()
    out: dict = {}
    for name in PREPARED_MODELS:
        full = dm.build(name)
        with torch.no_grad():
            ref = copy.deepcopy(full).double()(x.double())
            local = load_sharded(dm.skeleton(full, world, group), os.path.join(outdir, f"{name}.safetensors"),
                                 dm.module_plan(full), rank, world)
            y = local(x)
            y64 = copy.deepcopy(local, {id(group): group}).double()(x.double())
            torch._dynamo.reset()
            with bdpass.collect_reports() as rep:
                yc = torch.compile(local, backend="bd", options={**OPTIONS, "lowering": lowering})(x)
            torch._dynamo.reset()
        out[name] = {
            "err": _rel(y, ref), "err_unsharded": _rel(refs[f"{name}.prepared"], ref),
            "err64": _rel(y64, refs[f"{name}.prepared64"]), "err_compiled": _rel(yc, ref),
            "validation": [g.validation for g in rep.graphs], "fallback": [g.fallback for g in rep.graphs],
            "modules": {n: {"type": type(m).__name__, **m.spec()} for n, m in local.named_modules()
                        if isinstance(m, PREPARED_TYPES)},
            "factors": {k: list(v.shape) for k, v in local.state_dict().items()},
        }
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


def check_dtensor(results: list[dict], names=("mla", "gqa", "lowrank")) -> None:
    for rank, rr in enumerate(results):
        for name in names:
            res = rr[name]
            assert res["err"] < 1e-5, (name, res["err"])      # eager DTensor ~1e-7: nothing was rewritten
            assert res["rewrites"] == [], (name, res["rewrites"])
            assert all(f is None for f in res["fallback"]), res["fallback"]
        for name in {"mla", "gqa"} & set(names):
            reasons = {(s["kind"], s["reason"]) for s in rr[name]["skipped"]}
            assert {k for k, _ in reasons} == {"bd_qk", "bd_vo"}, reasons
            assert all(r.startswith("DTensor placement change (DTensor.") and "prepare the model before sharding"
                       in r for _, r in reasons), reasons


def check_divergent(results: list[dict], world: int) -> None:
    """Every rank finished (no check paired with another rank's collective) with outputs
    equal to the unsharded model's, each with its own decisions."""
    for rank, rr in enumerate(results):
        last = rank == world - 1
        for name in ("gqa", "mla", "lowrank"):
            res = rr[name]
            assert res["err"] <= 1.5 * res["eager_err"], (rank, name, res["err"], res["eager_err"])
        gqa, mla, low = rr["gqa"], rr["mla"], rr["lowrank"]
        if last:
            assert gqa["rewrites"] == [], gqa
            # refused with its reason: a skip, or the whole graph compiled as it is
            assert any(s["kind"] == "bd_vo" and "singular" in s["reason"] for s in gqa["skipped"]) or \
                any(f and "singular" in f for f in gqa["fallback"]), (gqa["skipped"], gqa["fallback"])
            assert mla["rewrites"] == [], mla
        else:
            assert _kinds(gqa) == {"bd_vo": 1}, gqa
            assert _kinds(mla) == {"bd_qk": 1, "bd_vo": 1}, mla
        for res in ([gqa] if not last else []) + ([mla] if not last else []):
            assert all(v.startswith("passed") for v in res["validation"]), res["validation"]
        if rank == 0:
            assert low["rewrites"] == [], low
            refused = [s for s in low["skipped"] if s["reason"].startswith("validation:")]
            assert [s["kind"] for s in refused] == ["pifa", "pifa"], low["skipped"]
        else:
            assert _kinds(low) == {"pifa": 2}, low
            assert all(v.startswith("passed") for v in low["validation"]), low["validation"]


def check_prepared(results: list[dict], world: int) -> None:
    """Per rank: the loaded shard run in float64 equals the unsharded prepared model in
    float64 (the split is exact); in float32 its error against the original in float64 is
    within 1.5x the unsharded prepared model's, eager and compiled with bd; each rank holds
    the local prepared modules of its heads / rank slice, and only its share of the factors."""
    mla, gqa, low = dm.MLA(), dm.GQABlock(), dm.LowRankMLP()
    for rank, rr in enumerate(results):
        for name in PREPARED_MODELS:
            res = rr[name]
            assert res["err64"] < 1e-12, (rank, name, res["err64"])
            assert res["err"] <= 1.5 * res["err_unsharded"], (rank, name, res["err"], res["err_unsharded"])
            assert res["err_compiled"] <= 1.5 * res["err_unsharded"], (rank, name, res["err_compiled"])
            assert all(v is None or v.startswith("passed") for v in res["validation"]), res["validation"]
            assert all(f is None for f in res["fallback"]), res["fallback"]
        c = mla.cfg
        (kv,) = rr["mla"]["modules"].items()
        assert kv[0] == "kv_b_proj" and kv[1]["type"] == "BDLinear", kv
        assert kv[1]["out_features"] == c["heads"] // world * (c["nope"] + c["v_dim"])
        assert kv[1]["tables"] == [c["nope"]] * (c["heads"] // world * 2), kv      # K-nope and V of each head
        factors = rr["mla"]["factors"]
        n = sum(v[0] * v[1] for k, v in factors.items() if k.startswith("kv_b_proj.weight_"))
        assert n == (c["latent"] - c["nope"]) * c["heads"] * (c["nope"] + c["v_dim"]) // world, n
        c = gqa.cfg
        (v,) = rr["gqa"]["modules"].items()
        assert v[0] == "v_proj" and v[1]["out_features"] == c["kv_heads"] // world * c["head_dim"], v
        n = sum(s[0] * s[1] for k, s in rr["gqa"]["factors"].items() if k.startswith("v_proj.weight_"))
        assert n == (c["hidden"] - c["head_dim"]) * c["kv_heads"] * c["head_dim"] // world, n
        c = low.cfg
        mods = rr["lowrank"]["modules"]
        rk = c["r_down"] // world
        assert mods["v_down"]["type"] == "Absorbed" and mods["u_down"]["type"] == "PivotLinear", mods
        assert mods["u_down"]["rank"] == rk, mods
        f = rr["lowrank"]["factors"]
        assert f["u_down.w_pivot"] == [c["ffn"], rk] and f["u_down.coeff"] == [rk, c["d"] - rk], f


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
        from bdpass.graph.layout.driver import _Analysis
        from bdpass.graph.linears import find_linears

        self.g.output(tuple(outputs))
        gm = torch.fx.GraphModule(torch.nn.Module(), self.g)
        sites = find_linears(gm, self.params)
        a = _Analysis(gm, sites, self.inputs)
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
        from bdpass.graph.layout.collectives import collective

        b2 = GraphBuilder()
        x2, k3 = _projection(b2)
        n = b2.call(legacy.all_reduce, k3, "max", "", [0, 1], 2, val=_t(2, 6, 32))
        assert collective(n).kind == "all_reduce" and collective(n).reduce_op == "max"


def _dynamo_closure(name: str, module: str = "torch._dynamo.variables.tensor"):
    """A function as torch 2.11's Dynamo puts a DTensor placement change into a graph: a
    closure over the placements, defined in Dynamo, with a name of its own."""
    def fn(x):
        return x
    fn.__name__, fn.__module__ = name, module
    return fn


def test_collective_classification():
    """Ops, overloads, the funcol Python wrappers and DTensor calls are recognised; ordinary ops
    are not."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import DTensor

    from bdpass.graph.layout.collectives import collective

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
    # torch 2.11's Dynamo records placement changes as closures of its own, named so
    for name, method in (("prim from_local", "from_local"), ("prim_redistribute", "redistribute"),
                         ("prim_to_local", "to_local")):
        c = collective(b.call(_dynamo_closure(name), k, val=_t(2, 6, 32)))
        assert c is not None and (c.kind, c.name) == ("dtensor", f"DTensor.{method}"), (name, c)
        assert collective(b.call(_dynamo_closure(name, module=__name__), k, val=_t(2, 6, 32))) is None
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

    dt_param = type("FakeDTensor", (), {})      # weight_problem on a real DTensor: see the rank programs
    assert weight_problem([]) is None and dt_param is not None


def test_collective_stand_ins():
    """Local values of a collective's shape: what a check that reruns a graph on one rank can
    use instead of communicating."""
    from bdpass.graph.layout.collectives import collective_stand_in

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


def test_checks_run_graphs_without_communicating():
    """Validation's runs of a graph with collectives (float64 and model dtype) use the local
    stand-ins: they run here without any process group, the original and a rewritten graph
    compare equal, and a wrong rewrite is still caught. A graph on DTensors, or with a
    collective without a stand-in, is not run at all."""
    from bdpass import validate as val
    from bdpass.graph.exact import CommunicatingGraph, Float64Interpreter, LocalInterpreter

    assert not dist.is_initialized()

    def graph(scale: float):
        b = GraphBuilder()
        x, k = _projection(b)
        w2 = b.input("w2", HIDDEN, 32, param=True)
        y = b.call(F_.linear, k, w2, val=_t(2, 6, HIDDEN))
        if scale != 1.0:
            y = b.call(torch.mul, y, scale, val=_t(2, 6, HIDDEN))
        ar = b.call(C10D.all_reduce, y, "sum", "0", val=_t(2, 6, HIDDEN))
        wt = b.call(C10D.wait_tensor, ar, val=_t(2, 6, HIDDEN))
        ag = b.call(C10D.all_gather_into_tensor, wt, 2, "0", val=_t(4, 6, HIDDEN))
        b.g.output((b.call(C10D.wait_tensor, ag, val=_t(4, 6, HIDDEN)),))
        return torch.fx.GraphModule(torch.nn.Module(), b.g), b.inputs

    gm, inputs = graph(1.0)
    torch.manual_seed(3)
    inputs = [torch.randn_like(t) for t in inputs]
    expect = F_.linear(F_.linear(inputs[0], inputs[1]), inputs[2])
    (out,) = LocalInterpreter(gm).run(*inputs)
    assert torch.equal(out, torch.cat([expect, expect]))
    (out64,) = Float64Interpreter(gm).run(*inputs)
    assert out64.dtype == torch.float64
    e64 = F_.linear(F_.linear(inputs[0].double(), inputs[1].double()), inputs[2].double())
    assert torch.allclose(out64, torch.cat([e64, e64]), rtol=1e-12, atol=0)
    weights = {1, 2}
    bad, ref = val.compare(gm, inputs, graph(1.0)[0], inputs, weights, 1e-12)
    assert bad is None, bad
    bad, _ = val.compare(gm, inputs, graph(1.0 + 1e-6)[0], inputs, weights, 1e-12, ref)
    assert bad is not None and "relative L2 difference" in bad
    e0, e1 = val.measured_errors(gm, inputs, graph(1.0)[0], inputs, weights, ref)
    assert e0 == e1 and e0 < 1e-6

    for make in (lambda b, t: b.call(dist.all_reduce, t, val=None),           # in place: no stand-in
                 lambda b, t: b.call("to_local", t, method=True, val=_t(2, 6, 32))):
        b = GraphBuilder()
        x, k = _projection(b)
        b.g.output((make(b, k),))
        with pytest.raises(CommunicatingGraph):
            LocalInterpreter(torch.fx.GraphModule(torch.nn.Module(), b.g)).run(*b.inputs)


def test_checks_refuse_dtensor_values(monkeypatch):
    """Any op on a DTensor may communicate: a local run refuses it (on a one-rank mesh here)."""
    from bdpass.graph.exact import CommunicatingGraph, LocalInterpreter
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        b = GraphBuilder()
        x, k = _projection(b)
        b.g.output((b.call(torch.relu, k, val=_t(2, 6, 32)),))
        gm = torch.fx.GraphModule(torch.nn.Module(), b.g)
        x_dt = DTensor.from_local(torch.randn(2, 6, HIDDEN), mesh, [Replicate()])
        with pytest.raises(CommunicatingGraph, match="DTensor"):
            LocalInterpreter(gm).run(x_dt, b.inputs[1])
        assert LocalInterpreter(gm).run(torch.randn(2, 6, HIDDEN), b.inputs[1])[0].shape == (2, 6, 32)
    finally:
        dist.destroy_process_group()


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
    """The rewritten graph with its all-reduce lowered by Inductor (C++ on CPU). Two ranks each
    compile C++ on a 2-core machine (92 s alone on torch 2.11 here, over 150 s with other
    jobs running): the watchdog against a hang is longer than the other programs'."""
    res = run_ranks("funcol_program", 2, timeout=300.0, names=["mla"], lowering="inductor", unsharded=False)
    check_mla(res, 2)


def test_ranks_that_decide_differently():
    """One rank rewrites where another does not, or validates units alone: the checks run
    without communicating, so the ranks' real collectives still pair up (a hang would hit
    the process group's 30 s timeout)."""
    check_divergent(run_ranks("divergent_program", 2, pg_timeout=30), 2)


def test_prepared_then_sharded(tmp_path):
    """Prepare once, save one checkpoint per model, load each rank's share of it."""
    prepare_checkpoints(str(tmp_path))
    check_prepared(run_ranks("prepared_program", 2, outdir=str(tmp_path)), 2)


# ---------------------------------------------------------------------------- sharding, one process
def _plan(**modules) -> dict:
    from bdpass.prepare.checkpoint import PLAN_FORMAT

    return {"format": PLAN_FORMAT, "bdpass_version": "test", "modules": modules, "folded": []}


class _Wrap(torch.nn.Module):
    def __init__(self, **mods):
        super().__init__()
        for k, m in mods.items():
            setattr(self, k, m)


def test_shard_bd_linear_by_heads():
    """A BDLinear split by heads: each rank's blocks, tables and factor columns; the ranks'
    outputs side by side are the whole projection's; cuts inside a head and row splits are
    refused."""
    from bdpass.prepare.modules import from_spec
    from bdpass.shard import ShardError, local_plan, shard_state

    torch.manual_seed(0)
    # two heads of 8 (table 0), two heads of 16 (table 1), 16 dense columns with bias (table 2)
    spec = {"type": "BDLinear", "replaces": "Linear", "in_features": 24, "out_features": 64,
            "tables": [8, 16, 0], "blocks": [[0, 0, 16, True], [1, 16, 32, False], [2, 48, 16, True]],
            "dtype": "float64"}
    full = from_spec(spec)
    with torch.no_grad():
        for n, t in full.named_parameters():
            t.copy_(torch.randn_like(t))
        for t, g in ((0, 8), (1, 16)):
            perm = torch.randperm(24)
            getattr(full, f"sel_{t}").copy_(perm[:g].sort().values)
            getattr(full, f"rest_{t}").copy_(perm[g:].sort().values)
        full.rest_2.copy_(torch.arange(24))
    plan, state = _plan(p=spec), {f"p.{k}": v for k, v in full.state_dict().items()}
    expect = [([8, 16], [[0, 0, 16, True], [1, 16, 16, False]]), ([16, 0], [[0, 0, 16, False], [1, 16, 16, True]])]
    x = torch.randn(3, 24, dtype=torch.float64)
    outs, n_factors = [], 0
    for rank in range(2):
        lp = local_plan(plan, {"p": "col"}, rank, 2)["modules"]["p"]
        assert (lp["tables"], lp["blocks"], lp["out_features"]) == (*expect[rank], 32), lp
        loc = shard_state(_Wrap(p=torch.nn.Linear(24, 32, dtype=torch.float64)), plan, state, {"p": "col"}, rank, 2)
        assert loc.p.spec() == lp
        outs.append(loc.p(x))
        n_factors += sum(p.numel() for p in loc.p.parameters())
    assert torch.allclose(torch.cat(outs, -1), full(x), rtol=1e-13, atol=0)
    assert n_factors == sum(p.numel() for p in full.parameters())         # nothing held twice
    assert local_plan(plan, {"p": "col"}, 3, 4)["modules"]["p"]["blocks"] == [[0, 0, 16, True]]
    assert local_plan(plan, {"p": "col"}, 1, 8)["modules"]["p"]["blocks"] == [[0, 0, 8, True]]   # 2nd 8-head
    for how, rank, world, msg in (("row", 1, 2, "by heads"), ("col", 2, 8, "cut a BD head"),
                                  ("col", 1, 3, "not divisible")):
        with pytest.raises(ShardError, match=msg):
            local_plan(plan, {"p": how}, rank, world)


@pytest.mark.parametrize("restore_order", [True, False])
def test_shard_pivot_linear_by_rank_slices(restore_order):
    """A PivotLinear split by rank slices: the ranks' outputs sum to the chain's (bias added
    once), each rank holds its pivots' slice; a column split is refused."""
    from bdpass.prepare.modules import from_spec
    from bdpass.shard import ShardError, local_plan, shard_state

    torch.manual_seed(1)
    spec = {"type": "PivotLinear", "replaces": "Linear", "in_features": 20, "rank": 8, "out_features": 24,
            "bias": True, "restore_order": restore_order, "dtype": "float64"}
    full = from_spec(spec)
    with torch.no_grad():
        for t in full.parameters():
            t.copy_(torch.randn_like(t))
        if restore_order:
            perm = torch.randperm(24)
            full.pivots.copy_(perm[:8])
            full.rest.copy_(perm[8:])
    absorbed = {"type": "Absorbed", "replaces": "Linear", "in_features": 20, "out_features": 8, "into": "u"}
    plan = _plan(v=absorbed, u=spec)
    state = {f"u.{k}": v for k, v in full.state_dict().items()}
    tp = {"v": "col", "u": "row"}
    x = torch.randn(3, 20, dtype=torch.float64)
    for world in (2, 4):
        total, n_pivot = 0, 0
        for rank in range(world):
            loc = shard_state(_Wrap(v=torch.nn.Linear(20, 8 // world, dtype=torch.float64),
                                    u=torch.nn.Linear(8 // world, 24, dtype=torch.float64)),
                              plan, state, tp, rank, world)
            assert loc.u.rank == 8 // world and loc.v.out_features == 8 // world
            assert torch.equal(loc.u.w_pivot, full.w_pivot[:, rank * 8 // world:(rank + 1) * 8 // world])
            total = total + loc.u(loc.v(x))
            n_pivot += loc.u.w_pivot.numel()
        assert torch.allclose(total, full(x), rtol=1e-13, atol=1e-13), world
        assert n_pivot == full.w_pivot.numel()
    with pytest.raises(ShardError, match="rank slices"):
        local_plan(plan, {"v": "col", "u": "col"}, 0, 2)
    with pytest.raises(ShardError, match="splits with its chain"):
        local_plan(plan, {"v": "row", "u": "row"}, 0, 2)


def test_dtensor_parallelize_module():
    check_dtensor(run_ranks("dtensor_program", 2, names=["mla", "gqa", "lowrank"]))


def test_4_ranks_both_styles():
    """4 ranks, kept small for CI: manual sharding (MLA, one head per rank; the low-rank chains
    at a quarter of their rank) and DTensor (MLA), one spawn; the full sweep is slow."""
    res = run_ranks("styles_program", 4, timeout=300, funcol=["mla", "lowrank"], dtensor=["mla"])
    check_mla([r["funcol"] for r in res], 4)
    check_lowrank([r["funcol"] for r in res], 4)
    check_dtensor([r["dtensor"] for r in res], ["mla"])


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
