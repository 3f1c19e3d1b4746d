"""Fuzzing the bd backend with random models that compose rewrite sites the way compressed
and hand-written transformers do.

    python tests/fuzz.py --cases 1000 [--seed 0] [--lowering aot_eager] [--family mixed]
                         [--inductor-every 10] [--half 0.12] [--reshape 0.2] [--update 0.15]
                         [--no-validate]

Families (``--family``; ``mixed``, the default, draws one per seed, see ``FAMILY_WEIGHTS``):

* ``legacy``: the original generator (random attention blocks: heads, ``d_h``, GQA, bias,
  RoPE off/full/partial, fused QKV, q/k norm, SDPA or eager; random low-rank chains in four
  spellings); ``run_case(seed)`` still runs it by default.
* ``chain_chain``: 2-4 low-rank pairs (and a few dense layers) feeding each other, each in
  any spelling (``nn.Linear`` pairs with/without biases, ``F.linear`` + separate bias,
  ``Conv1D``/``addmm`` with views, ``@`` with reshapes, ``x @ W.T``, ``einsum``, ``einsum``
  over head dims), ops inside a pair (dropout, reshape, cast, an explicit singular-value
  vector), and between pairs: GELU/SiLU/ReLU/tanh/sigmoid/neg, LayerNorm/RMSNorm (torch's and Llama's),
  residual adds, scalar scales, dtype round trips, eval dropout, reshapes, flatten, a
  transpose of leading dims, a separate shift.
* ``swiglu``: ``down(act(gate(x)) * up(x))`` (and ungated MLPs), each projection a low-rank
  pair in any spelling, 1-3 layers with norms and residuals.
* ``shared``: one basis linear shared by several layers' coefficient linears (Basis
  Sharing: one chain per layer), one basis output read by several coefficient linears
  (Palu: no chain may be rewritten), or one low-rank pair applied by every layer (ALBERT).
* ``lowrank_attn``: attention whose q/k/v/o are mostly low-rank pairs (SDPA, SDPA with
  ``enable_gqa``, eager softmax, einsum; RoPE none/full/partial; GQA by expand or
  repeat_interleave; q/k norm; keys/values returned as a cache).
* ``fused_qkv``: one QKV projection (dense or low-rank) split in the layouts of Phi-3
  (slices), Qwen (split), ChatGLM (split + views), Falcon (per-group view, list or integer
  index, ``broadcast_to``), GPT-NeoX (per-head view), ViT (reshape/permute/unbind), chunk;
  optionally followed by a low-rank MLP.
* ``blocks``: 1-3 pre-norm layers (attention dense/low-rank/fused/MLA next to a low-rank
  MLP), optionally a low-rank head.

A minority of cases (``--half``) run in bfloat16/float16; every ``--inductor-every``-th seed
is lowered by Inductor instead of ``--lowering``; a fraction (``--reshape``) is also called with
other leading sizes, which Dynamo compiles again as a dynamic-shape graph; a fraction
(``--update``) then has every weight changed in place and is called again (the factors must be
recomputed: judged against a float64 run of the new weights). Attention blocks
sometimes also return their keys (and values) as a KV cache would; every output is compared.

Each case is compiled with ``backend="bd"`` (``cost_model`` off and ``min_saving`` 0, so
every legal rewrite is applied; ``strict``, so internal errors and validation refusals
raise) and checked:

* compilation succeeds (``crash``; a rewrite refused by the pass's own float64 validation
  is a ``validation`` failure: the analysis or rewrite was wrong for that graph);
* the output's relative-L2 error against a float64 eager run of the same weights is within
  ``max(error bounds of the rewrites, 1.5) * max(eager error, 8 units of roundoff)`` in the
  model's dtype, on the example input and on a second input of the same shape (``wrong``);
* the report is consistent (``report``): one graph, weights before = the model's, weights
  after = those the rewritten graph actually reads (parameters plus derived factors), each
  PIFA record's counts match its pair, no rewrite where none is legal;
* what can be predicted is there (``missed``): every low-rank pair is rewritten or skipped
  for a numerical reason, or with the expected reason (a shared intermediate; a reason naming
  a weight that other linears also read; "would not shrink the weights" with counts that
  match the pair; a limitation the pass documents, counted as a note); BD on attention blocks
  whose projections are dense, where legal. The error bound is each record's worst-case
  ``error_bound``.

Exit status is non-zero if any case fails; each failure is printed with its seed and the
command that reruns it alone.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import re
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bdpass  # noqa: E402
from attention_models import MHA  # noqa: E402
from compose_models import (BD_BUDGET_REASONS, PIFA_BUDGET_REASONS, PIFA_KNOWN_LIMITS, Case,  # noqa: E402
                            as_dtype, build)
from helpers import first_tensor, rel_l2, to64  # noqa: E402
from lowrank_models import AsvdLinear, Conv1DChain, MatmulChain, SvdLinear  # noqa: E402

FAMILY_WEIGHTS = {"legacy": 2.0, "chain_chain": 3.0, "swiglu": 1.2, "shared": 1.0, "lowrank_attn": 1.2,
                  "fused_qkv": 1.4, "blocks": 1.4}
SEVERITY = ("crash", "validation", "wrong", "report", "missed", "generator")
HALF_DEFAULT = 0.12
INDUCTOR_EVERY_DEFAULT = 10
RESHAPE_DEFAULT = 0.2
UPDATE_DEFAULT = 0.15


def make_case(seed: int):
    """(module, inputs, expected kinds, description) for one seed of the original generator."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if rng.random() < 0.6:
        head_dim = rng.choice([4, 6, 8, 12, 16])
        kvh = rng.choice([1, 2, 3])
        gqa = rng.choice([1, 2, 3])
        heads = kvh * gqa
        d = rng.choice([head_dim * heads + rng.randint(1, 24), 2 * head_dim + rng.randint(0, 16)])
        d = max(d, head_dim + 1)
        rope = rng.choice(["none", "full", "partial"])
        if rope == "partial" and head_dim % 4:
            rope = "none"
        if rope == "full" and head_dim % 2:
            rope = "none"
        attn = rng.choice(["sdpa", "eager", "sdpa_gqa"])
        kw = dict(d=d, heads=heads, head_dim=head_dim, gqa=gqa, bias=rng.random() < 0.5, attn=attn,
                  rope=rope, fused=rng.random() < 0.3, qk_norm=rng.random() < 0.15,
                  causal=rng.random() < 0.7, gqa_style=rng.choice(["expand", "repeat_interleave"]))
        model = MHA(**kw)
        x = torch.randn(rng.randint(1, 3), rng.randint(2, 12), d)
        expected = {"bd_vo"}
        if rope != "full" and not kw["qk_norm"]:
            expected.add("bd_qk")
        return model, (x,), expected, kw
    d_in, d_out = rng.randint(4, 96), rng.randint(4, 96)
    r = rng.randint(1, min(d_in, d_out) - 1) if min(d_in, d_out) > 1 else 1
    kind = rng.choice(["svd", "asvd", "conv1d", "matmul"])
    model = {"svd": lambda: SvdLinear(d_in, r, d_out, bias_v=rng.random() < 0.5, bias_u=rng.random() < 0.5),
             "asvd": lambda: AsvdLinear(d_in, r, d_out, bias=rng.random() < 0.5),
             "conv1d": lambda: Conv1DChain(d_in, r, d_out),
             "matmul": lambda: MatmulChain(d_in, r, d_out)}[kind]()
    x = torch.randn(rng.randint(1, 3), rng.randint(1, 9), d_in)
    expected = {"pifa"} if r < min(d_in, d_out) else set()
    return model, (x,), expected, {"chain": kind, "d_in": d_in, "r": r, "d_out": d_out}


# ------------------------------------------------------------------------------ case selection
@dataclass
class Plan:
    seed: int
    family: str
    dtype: torch.dtype
    lowering: str
    reshape: bool = False       # also call with other leading sizes (Dynamo recompiles, dynamic shapes)
    update: bool = False        # then change every weight in place and call again (factors refreshed)


def plan(seed: int, family: str = "mixed", lowering: str = "aot_eager", half: float = HALF_DEFAULT,
         inductor_every: int = INDUCTOR_EVERY_DEFAULT, reshape: float = RESHAPE_DEFAULT,
         update: float = UPDATE_DEFAULT) -> Plan:
    """Family, dtype and lowering of one seed (a function of the seed and the options only)."""
    rng = random.Random(f"plan:{seed}")
    if family == "mixed":
        names = list(FAMILY_WEIGHTS)
        family = rng.choices(names, weights=[FAMILY_WEIGHTS[n] for n in names])[0]
    else:
        rng.random()
    dtype = torch.float32
    if family != "legacy" and rng.random() < half:
        dtype = rng.choice([torch.bfloat16, torch.float16])
    low = lowering
    if lowering == "aot_eager" and inductor_every and seed % inductor_every == inductor_every - 1:
        low = "inductor"
    again = family != "legacy" and rng.random() < reshape
    upd = family != "legacy" and rng.random() < update
    return Plan(seed, family, dtype, low, again, upd)


def build_case(p: Plan) -> Case:
    if p.family == "legacy":
        model, args, expected, desc = make_case(p.seed)
        case = Case("legacy", model.eval(), args, dict(desc))
        case.legacy_expected = expected
        return case
    case = build(p.family, p.seed)
    if p.dtype != torch.float32:
        as_dtype(case, p.dtype)
    return case


# ------------------------------------------------------------------------------ checks
@dataclass
class Outcome:
    category: str | None        # None: passed; else one of SEVERITY
    message: str = ""
    seconds: float = 0.0
    notes: tuple = ()           # not failures: documented limitations met, rewrites that grow weights
    applied: tuple = ()         # kinds of the rewrites applied


OPTIONS = {"cost_model": False, "min_saving": 0.0, "strict": True}


def _is_validation_error(e: BaseException) -> bool:
    from bdpass.validate import RewriteValidationError

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, RewriteValidationError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _under(site: str, path: str) -> bool:
    return path == "" or site == path or site.startswith(path + ".")


def _names_site(site: str, key: str) -> bool:
    """Whether a report site (``a``, or ``a -> b``) names the module ``key`` (or one below it)."""
    return any(part == key or part.startswith(key + ".") for part in site.split(" -> "))


def _weights_read(graph_report) -> int | None:
    """Weight elements the rewritten graph reads: parameters and floating derived inputs."""
    kept = graph_report.graphs_kept
    if kept is None:
        return None
    gm, new_gm, ex, new_ex = kept
    if new_gm is None:
        return None
    phs = [n for n in new_gm.graph.nodes if n.op == "placeholder"]
    total = 0
    for i, n in enumerate(phs):
        if not n.users or i >= len(new_ex):
            continue
        t = new_ex[i]
        if not isinstance(t, torch.Tensor):
            continue
        if i < len(ex):
            if isinstance(t, torch.nn.Parameter):
                total += t.numel()
        elif t.is_floating_point():
            total += t.numel()
    return total


def _claimed_growth(reason: str) -> tuple[int, int] | None:
    """(before, after) of a PIFA skip saying the rewrite would not shrink the pair's weights."""
    m = re.search(r"would not shrink the weights \(([\d,]+) -> ([\d,]+)", reason)
    return None if m is None else (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", "")))


def _budget(reason: str, allowed) -> bool:
    return any(a in reason for a in allowed)


def check_report(case: Case, g, model_params: int, expectations: bool = True) -> list[tuple[str, str]]:
    """(category, message) for each inconsistency of one graph's report with the model."""
    problems: list[tuple[str, str]] = []
    if g.fallback:
        problems.append(("crash", f"fell back: {g.fallback}"))
    if g.params_before != model_params:
        problems.append(("report", f"params_before {g.params_before} != model's {model_params}"))
    saved = sum(r.params_saved for r in g.rewrites)
    if g.params_before - g.params_after != saved:
        problems.append(("report", f"params_before - params_after = {g.params_before - g.params_after} != "
                                   f"sum of rewrites' savings {saved}"))
    read = _weights_read(g)
    if g.rewrites and read is not None and read != g.params_after:
        problems.append(("report", f"params_after {g.params_after} but the rewritten graph reads {read} "
                                   f"weight elements ({g.params_before} before)"))
    if not expectations:
        return problems
    kinds = {r.kind for r in g.rewrites}
    legacy = getattr(case, "legacy_expected", None)
    if legacy is not None:
        budget_skips = {s.kind for s in g.skipped if _budget(s.reason, ("budget", "singular"))}
        for s in g.skipped:      # a chain model holds only its pair: a growth claim must count all of it
            grow = _claimed_growth(s.reason)
            if s.kind == "pifa" and grow is not None and grow[0] == model_params and grow[1] >= grow[0]:
                budget_skips.add("pifa")
        if not kinds <= legacy:
            problems.append(("report", f"rewrites {sorted(kinds)} not expected (expected {sorted(legacy)})"))
        if not legacy - budget_skips <= kinds:
            problems.append(("missed", f"rewrites {sorted(kinds)} != expected {sorted(legacy)}"))
        return problems
    # ---- PIFA: every record is one of the model's pairs, with its counts
    by_weights = {tuple(c.weights): c for c in case.chains}
    applied = {}
    for r in g.rewrites:
        if r.kind != "pifa":
            continue
        w = tuple(r.details.get("weights", ()))
        c = by_weights.get(w)
        if c is None:
            problems.append(("report", f"pifa applied at {r.site} on {w}, which is no low-rank pair of the model"))
            continue
        applied[w] = r
        if c.status.startswith("skip:"):
            problems.append(("report", f"pifa applied at {r.site} but it must be skipped ({c.status[5:]})"))
        # the rewritten pair: pivot and coefficient weights, and a bias over the pivots (r) or over
        # every output (d_out) when either linear had one; the graph's totals are checked exactly
        core = c.d_in * c.r + c.r * (c.d_out - c.r)
        want_after = {core + c.r, core + c.d_out} if c.bias else {core}
        if r.params_after > r.params_before:
            problems.append(("note", f"pifa grows weights ({r.params_before} -> {r.params_after})"))
        if r.params_before != c.params or r.params_after not in want_after:
            problems.append(("report", f"pifa at {r.site}: params {r.params_before} -> {r.params_after}, "
                                       f"expected {c.params} -> {' or '.join(map(str, sorted(want_after)))}"))
        d = r.details
        if (d.get("d_in"), d.get("r"), d.get("d_out")) != (c.d_in, c.r, c.d_out):
            problems.append(("report", f"pifa at {r.site}: shape {d.get('d_in')}-{d.get('r')}-{d.get('d_out')} "
                                       f"!= {c.d_in}-{c.r}-{c.d_out}"))
    pifa_skips = [s for s in g.skipped if s.kind == "pifa"]
    for c in case.chains:
        if c.status == "any" or tuple(c.weights) in applied:
            continue
        mine = [s for s in pifa_skips if _names_site(s.site, c.key)]
        if c.status == "apply":
            grow = [_claimed_growth(s.reason) for s in mine]
            grow = [g for g in grow if g is not None]
            if c.shared and any(w in s.reason for s in mine for w in c.shared):
                problems.append(("note", "pifa skipped: a weight is shared with other linears"))
            elif grow:
                before, after = grow[0]
                least = c.d_in * c.r + c.r * (c.d_out - c.r)      # the rewritten pair's weights alone
                if before != c.params or after < before or after < least:
                    problems.append(("report", f"pifa at {c.key} skipped as 'would not shrink' with counts "
                                               f"{before} -> {after}, but the pair holds {c.params} and its "
                                               f"rewrite at least {least}"))
                else:
                    problems.append(("note", "pifa skipped: would not shrink the weights"))
            elif any(_budget(s.reason, PIFA_KNOWN_LIMITS) for s in mine):
                why = next(s.reason for s in mine if _budget(s.reason, PIFA_KNOWN_LIMITS))
                problems.append(("note", "pifa skipped, documented limit: " + why.split(" ", 1)[-1]))
            elif not any(_budget(s.reason, PIFA_BUDGET_REASONS) for s in mine):
                why = "; ".join(s.reason for s in mine) or "no skip record"
                problems.append(("missed", f"low-rank pair {c.key} ({c.d_in}-{c.r}-{c.d_out}) not rewritten: {why}"))
        else:
            want = c.status[5:]
            if not any(want in s.reason for s in mine):
                why = "; ".join(s.reason for s in mine) or "no skip record"
                problems.append(("missed", f"low-rank pair {c.key}: expected a skip for '{want}', got: {why}"))
    # ---- BD: required kinds per attention block, nothing outside the possible ones
    for a in case.attns:
        for kind in sorted(a.required):
            done = any(r.kind == kind and _under(r.site, a.path) for r in g.rewrites)
            excused = any(s.kind == kind and _under(s.site, a.path) and _budget(s.reason, BD_BUDGET_REASONS)
                          for s in g.skipped)
            if not (done or excused):
                why = "; ".join(f"{s.site}: {s.reason}" for s in g.skipped
                                if s.kind == kind and _under(s.site, a.path)) or "no skip record"
                problems.append(("missed", f"{kind} at {a.path or '<root>'} neither applied nor skipped for a "
                                           f"numerical reason: {why}"))
    for r in g.rewrites:
        if r.kind == "pifa":
            continue
        homes = [a for a in case.attns if _under(r.site, a.path)]
        if not any(r.kind in a.possible for a in homes):
            problems.append(("report", f"{r.kind} applied at {r.site}, where no attention block allows it"))
    return problems


def _error(out, ref, eager, bound: float, dtype: torch.dtype) -> tuple[bool, float, float, float]:
    e_bd, e_eager = rel_l2(out, ref), rel_l2(eager, ref)
    floor = 8 * torch.finfo(dtype).eps / 2
    limit = bound * max(e_eager, floor)
    return e_bd <= limit, e_bd, e_eager, limit


def _flat(out) -> list:
    """Every tensor of a model output (the output itself, then e.g. returned caches)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return [first_tensor(out)]


def _other_shape(args: tuple, gen: torch.Generator) -> tuple:
    """Inputs with different leading sizes (positions, and batch for 2-D inputs)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() >= 2:
            shape = list(a.shape)
            shape[-2] += 3
            out.append(torch.randn(shape, generator=gen).to(a.dtype))
        else:
            out.append(a)
    return tuple(out)


def _perturb_weights(model: torch.nn.Module) -> None:
    """Change every parameter in place (noise of 5% of its mean magnitude): what an optimizer
    step or ``load_state_dict`` of other weights does; pivots may change."""
    g = torch.Generator().manual_seed(777)
    with torch.no_grad():
        for p in model.parameters():
            scale = float(p.detach().abs().double().mean()) or 1.0
            p.add_((torch.randn(p.shape, generator=g) * (0.05 * scale)).to(p.dtype))


def check_case(case: Case, lowering: str, validate: bool = True, reshape: bool = False,
               update: bool = False) -> Outcome:
    model = case.model.eval()
    args = case.args
    dtype = case.dtype
    opts = {**OPTIONS, "lowering": lowering, "validate": validate}
    gen = torch.Generator().manual_seed(12345)
    calls = [("", args), (" (second input)", tuple(torch.randn(a.shape, generator=gen).to(a.dtype)
                                                   if isinstance(a, torch.Tensor) and a.is_floating_point()
                                                   else a for a in args))]
    if reshape:
        calls.append((" (other leading sizes, recompiled)", _other_shape(args, gen)))
    model_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        try:
            ref_model = copy.deepcopy(model).double()
            refs = [_flat(ref_model(*to64(a))) for _, a in calls]
            eagers = [_flat(model(*a)) for _, a in calls]
        except Exception as e:  # noqa: BLE001 - the generator built a broken model
            return Outcome("generator", f"eager run failed: {type(e).__name__}: {e}")
        if not all(bool(torch.isfinite(t).all()) for ts in refs + eagers for t in ts):
            return Outcome("generator", "non-finite eager output")
        torch._dynamo.reset()
        outs: list = []
        problems: list[tuple[str, str]] = []
        updated = None
        try:
            with bdpass.collect_reports(keep_graphs=True) as rep:
                compiled = torch.compile(model, backend="bd", options=opts)
                for tag, a in calls:
                    outs.append(_flat(compiled(*a)))
                if update:
                    _perturb_weights(model)
                    ref_u = _flat(copy.deepcopy(model).double()(*to64(args)))
                    eager_u = _flat(model(*args))
                    n_graphs = len(rep.graphs)
                    updated = (_flat(compiled(*args)), ref_u, eager_u, len(rep.graphs) - n_graphs)
        except Exception as e:  # noqa: BLE001 - a fuzz failure to report
            cat = "validation" if _is_validation_error(e) else "crash"
            msg = str(e).strip().splitlines()
            where = calls[len(outs)][0] if len(outs) < len(calls) else " (after an in-place weight update)"
            problems.append((cat, f"compile failed{where}: {type(e).__name__}: "
                                  f"{' | '.join(msg[:3])[:600]}"))
            if not outs:
                return Outcome(cat, problems[0][1])
            calls = calls[:len(outs)]           # still check what ran before the failure
        finally:
            torch._dynamo.reset()
    want_graphs = 2 if len(calls) > 2 else 1
    if len(rep.graphs) < want_graphs:
        return Outcome("generator", f"{len(rep.graphs)} graphs compiled, expected {want_graphs} (graph break?)")
    problems += check_report(case, rep.graphs[0], model_params)
    for g in rep.graphs[1:want_graphs]:
        problems += [(c, f"{m} (recompiled graph)") for c, m in check_report(case, g, model_params, False)]
    for i, ((tag, _), out, ref, eager) in enumerate(zip(calls, outs, refs, eagers)):
        g = rep.graphs[min(i, len(rep.graphs) - 1)]
        bound = max([r.error_bound for r in g.rewrites] + [1.5])
        if len(out) != len(ref):
            problems.append(("wrong", f"{len(out)} outputs != {len(ref)}{tag}"))
            continue
        for j, (o, rf, eg) in enumerate(zip(out, ref, eager)):
            what = f"output {j}{tag}"
            if o.shape != rf.shape:
                problems.append(("wrong", f"{what}: shape {tuple(o.shape)} != {tuple(rf.shape)}"))
                continue
            ok, e_bd, e_eager, limit = _error(o, rf, eg, bound, dtype)
            if not ok:
                problems.append(("wrong", f"{what}: error {e_bd:.3g} > {limit:.3g} = bound {bound:.3g} x max("
                                          f"eager {e_eager:.3g}, 8u); rewrites "
                                          f"{sorted(Counter(r.kind for r in g.rewrites).items())}"))
    if updated is not None:
        problems += _check_update(model, args, opts, dtype, *updated)
    notes = tuple(m for c, m in problems if c == "note")
    applied = tuple(r.kind for r in rep.rewrites)
    problems = [p for p in problems if p[0] != "note"]
    if not problems:
        return Outcome(None, notes=notes, applied=applied)
    problems.sort(key=lambda p: SEVERITY.index(p[0]))
    return Outcome(problems[0][0], " || ".join(f"[{c}] {m}" for c, m in problems)[:3000], notes=notes,
                   applied=applied)


def _check_update(model, args, opts, dtype, out, ref, eager, recompiled: int) -> list[tuple[str, str]]:
    """The compiled model after its weights changed in place must compute with the new weights:
    its error is judged with the error bounds of a fresh compile of the new weights."""
    with torch.no_grad():
        torch._dynamo.reset()
        try:
            with bdpass.collect_reports() as fresh:
                torch.compile(copy.deepcopy(model), backend="bd", options=opts)(*args)
        except Exception as e:  # noqa: BLE001
            return [("crash", f"fresh compile of the updated weights failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300]}")]
        finally:
            torch._dynamo.reset()
    bound = max([r.error_bound for r in fresh.rewrites] + [1.5])
    problems = []
    for j, (o, rf, eg) in enumerate(zip(out, ref, eager)):
        ok, e_bd, e_eager, limit = _error(o, rf, eg, bound, dtype)
        if not ok:
            problems.append(("wrong", f"output {j} after an in-place weight update{' (recompiled)' if recompiled else ''}"
                                      f": error {e_bd:.3g} > {limit:.3g} = bound {bound:.3g} x max(eager "
                                      f"{e_eager:.3g}, 8u) (stale factors?)"))
    return problems


def run_plan(p: Plan, validate: bool = True) -> Outcome:
    t0 = time.time()
    try:
        case = build_case(p)
    except Exception as e:  # noqa: BLE001
        return Outcome("generator", f"building the case failed: {type(e).__name__}: {e}", time.time() - t0)
    out = check_case(case, p.lowering, validate, p.reshape, p.update)
    out.seconds = time.time() - t0
    out.message = f"{out.message} ; case: {case.desc}" if out.category else ""
    return out


def run_case(seed: int, lowering: str = "aot_eager", family: str = "legacy") -> str | None:
    """None if the case passes, else a description of the failure (the original generator by
    default; ``family="mixed"`` or a name of ``FAMILY_WEIGHTS`` for the composed ones)."""
    p = plan(seed, family, lowering, inductor_every=0, reshape=0.0, update=0.0)
    o = run_plan(p)
    if o.category is None:
        return None
    return f"seed {seed} [{p.family} {str(p.dtype)[6:]} {p.lowering}] {o.category}: {o.message}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lowering", default="aot_eager")
    ap.add_argument("--family", default="mixed", choices=["mixed"] + list(FAMILY_WEIGHTS))
    ap.add_argument("--inductor-every", type=int, default=INDUCTOR_EVERY_DEFAULT,
                    help="with --lowering aot_eager, lower every N-th seed with inductor (0: never)")
    ap.add_argument("--half", type=float, default=HALF_DEFAULT, help="fraction of cases in bf16/fp16")
    ap.add_argument("--reshape", type=float, default=RESHAPE_DEFAULT,
                    help="fraction of cases also called with other leading sizes (a recompiled, dynamic graph)")
    ap.add_argument("--update", type=float, default=UPDATE_DEFAULT,
                    help="fraction of cases whose weights then change in place before another call")
    ap.add_argument("--no-validate", action="store_true",
                    help="compile without the pass's float64 validation (to see a wrong rewrite's output)")
    a = ap.parse_args()
    import bdpass as _b
    print(f"bdpass from {os.path.dirname(_b.__file__)}; torch {torch.__version__}", flush=True)
    counts: Counter = Counter()
    notes: Counter = Counter()
    per_family_kinds: dict[str, Counter] = {}
    per_family: dict[str, Counter] = {}
    failures = []
    t0 = time.time()
    for s in range(a.seed, a.seed + a.cases):
        p = plan(s, a.family, a.lowering, a.half, a.inductor_every, a.reshape, a.update)
        with contextlib.redirect_stderr(io.StringIO()):      # torch prints failing FX code there
            o = run_plan(p, validate=not a.no_validate)
        cat = o.category or "passed"
        for n in o.notes:
            notes[n.split(" (")[0] if n.startswith("pifa grows") else n] += 1
        fam_kinds = per_family_kinds.setdefault(p.family, Counter())
        fam_kinds.update(o.applied)
        counts[cat] += 1
        fam = per_family.setdefault(p.family, Counter())
        fam[cat] += 1
        fam[f"{str(p.dtype)[6:]}/{p.lowering}"] += 1
        fam["reshaped"] += p.reshape
        fam["updated"] += p.update
        if o.category:
            line = (f"seed {s} [{p.family} {str(p.dtype)[6:]} {p.lowering}{' reshaped' if p.reshape else ''}"
                    f"{' updated' if p.update else ''}] "
                    f"{o.category}: {o.message}\n"
                    f"    rerun: python tests/fuzz.py --cases 1 --seed {s} --family {a.family} "
                    f"--lowering {a.lowering} --inductor-every {a.inductor_every} --half {a.half} "
                    f"--reshape {a.reshape} --update {a.update}")
            failures.append(line)
            print(line, flush=True)
        if (s - a.seed + 1) % 50 == 0:
            print(f"... {s - a.seed + 1} cases, {dict(counts)}, {time.time() - t0:.0f}s", flush=True)
    print("\nper family:")
    for fam, c in sorted(per_family.items()):
        print(f"  {fam:13s} " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())) + "; rewrites applied: "
              + ", ".join(f"{k} x{v}" for k, v in sorted(per_family_kinds.get(fam, Counter()).items())))
    if notes:
        print("notes (not failures):")
        for n, k in notes.most_common():
            print(f"  {k:5d} x {n}")
    failed = a.cases - counts["passed"]
    print(f"{counts['passed']} passed, {failed} failed "
          f"({', '.join(f'{k} {counts[k]}' for k in SEVERITY if counts[k]) or 'none'}) in {time.time() - t0:.0f}s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
