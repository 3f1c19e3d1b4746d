"""Speed of the bd backend against plain Inductor on the shapes that matter, in one process.

    python benchmarks/bd_speed.py [--tokens 16,256,1024,4096] [--dtypes float32,bfloat16]
                                  [--what projection,block,pifa] [--out benchmarks/results/cpu_speed.json]
                                  [--plot benchmarks/results/cpu_speed.png] [--repeats 15]
                                  [--block-tokens 256,1024]

* ``projection``: DeepSeek-V2-Lite's ``kv_b_proj`` (latent 512 -> 16 heads x (128 K-nope +
  128 V)) with BD on both parts, in each form (one pivot set for all heads, two groups,
  per-head pivots): ``torch.ops.bdpass.bd_linear`` (opaque to Inductor, so called directly)
  against ``F.linear`` compiled by Inductor.
* ``block``: an MLA attention block, compiled with ``backend="bd"`` (default options: the
  backend measures and picks) against ``backend="inductor"``. Two shapes: DeepSeek-V2-Lite's
  attention (hidden 2048, q_proj, kv_a_proj_with_mqa -> RMSNorm -> kv_b_proj, partial RoPE,
  o_proj) and an MLA-shaped block on the latent width (hidden 512: the K/V projection is a
  larger share of the work). The FLOP-model ideal speedup is printed with each.
* ``pifa``: a rank-50% low-rank pair d=2048, r=1024 (``u(v(x))``), default options.

Times are medians of interleaved repeats (order alternating each round; each compiled
function has its own code object: ``benchmarks/_bench.py``). Errors are relative L2
against a float64 eager run of the same weights. CPU figures depend on the machine: the
JSON records it.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bdpass  # noqa: E402
import inductor_lowerings  # noqa: E402,F401
from bdpass import timing  # noqa: E402

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from _bench import entry, interleaved, warm_compiler  # noqa: E402


# ----------------------------------------------------------------------------- models
def rope(x, pos):
    d = x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class MLA(nn.Module):
    """DeepSeek-V2-style multi-head latent attention (no q compression)."""

    def __init__(self, hidden=2048, heads=16, latent=512, nope=128, rope_dim=64, v_dim=128):
        super().__init__()
        self.h, self.nope, self.rd, self.vd, self.latent = heads, nope, rope_dim, v_dim, latent
        self.q_proj = nn.Linear(hidden, heads * (nope + rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, latent + rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(latent)
        self.kv_b_proj = nn.Linear(latent, heads * (nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        q = self.q_proj(x).view(B, T, self.h, self.nope + self.rd).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rd], dim=-1)
        ckv, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.latent, self.rd], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv)).view(B, T, self.h, self.nope + self.vd).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.vd], dim=-1)
        k_pe = rope(k_pe.view(B, 1, T, self.rd), pos)
        q_pe = rope(q_pe, pos)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.h, T, self.rd)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.vd))

    def flops(self, T):
        """Multiply-adds per token of each part (prefill of T tokens, causal attention)."""
        hid = self.q_proj.in_features
        proj = {"q_proj": hid * self.q_proj.out_features, "kv_a": hid * self.kv_a_proj_with_mqa.out_features,
                "kv_b": self.latent * self.kv_b_proj.out_features, "o_proj": self.h * self.vd * hid}
        attn = self.h * (T + 1) / 2 * ((self.nope + self.rd) + self.vd)
        return proj, attn

    def ideal(self, T):
        """FLOP-model speedup of BD on kv_b_proj (its K-nope and V heads lose d_h of d_in rows)."""
        proj, attn = self.flops(T)
        total = sum(proj.values()) + attn
        saved = proj["kv_b"] * self.nope / self.latent
        return total / (total - saved)


class LowRank(nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.v_proj = nn.Linear(d, r, bias=False)
        self.u_proj = nn.Linear(r, d)

    def forward(self, x):
        return self.u_proj(self.v_proj(x))


# ----------------------------------------------------------------------------- timing
def rel(a, ref):
    return float(torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref))


def init_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        else:
            p.data.fill_(1.0)
    return model


# ----------------------------------------------------------------------------- sections
def projection(M, dtype, repeats):
    """kv_b_proj alone in every form."""
    from bdpass.identities import bd_factors_with_rows, pivot_columns
    from bdpass.rewrites.bd_factors import _shared_rows

    torch.manual_seed(0)
    d_in, H, g = 512, 16, 128
    W = torch.randn(2 * H * g, d_in) / math.sqrt(d_in)           # (out, in): heads [K_h, V_h] side by side
    heads = W.view(2 * H, g, d_in).transpose(1, 2).double()       # (2H, d_in, g)
    x = torch.randn(M, d_in, dtype=dtype)
    Wd = W.to(dtype)
    out = {}
    fns = {"inductor": torch.compile(lambda x: F.linear(x, Wd), dynamic=False)}
    conds = {}
    for form in ("shared", "groups", "per_head"):
        if form == "per_head":
            rows = torch.stack([pivot_columns(h.T, g) for h in heads])
            tables = list(range(2 * H))
        elif form == "groups":
            tables = [h * 2 // (2 * H) for h in range(2 * H)]
            rows = torch.stack([_shared_rows(heads[[h for h in range(2 * H) if tables[h] == t]]) for t in range(2)])
        else:
            tables = [0] * (2 * H)
            rows = _shared_rows(heads)[None]
        f = bd_factors_with_rows(heads, rows[tables], dtype=torch.float64)
        conds[form] = max(f.conds)
        sel, rest, weight, btab, bcol = [], [], [], [], []
        for t in range(rows.shape[0]):
            keep = torch.ones(d_in, dtype=torch.bool)
            keep[rows[t]] = False
            sel.append(rows[t])
            rest.append(torch.nonzero(keep).flatten())
        h = 0
        while h < 2 * H:           # runs of adjacent heads sharing a table
            e = h
            while e + 1 < 2 * H and tables[e + 1] == tables[h]:
                e += 1
            weight.append(torch.cat([f.w_rest[k] for k in range(h, e + 1)], dim=1).to(dtype))
            btab.append(tables[h])
            bcol.append(h * g)
            h = e + 1
        args = (sel, rest, weight, [None] * len(weight), btab, bcol, 2 * H * g)
        # the op is opaque to Inductor (an external call either way): called directly
        fns[form] = (lambda x, a=args: torch.ops.bdpass.bd_linear(x, *a))
    with torch.no_grad():
        t = interleaved({k: (lambda f=f: f(x)) for k, f in fns.items()}, repeats)
    for form in ("shared", "groups", "per_head"):
        out[form] = {"ratio": t["inductor"] / t[form], "ms": t[form] * 1e3, "cond": conds[form]}
    out["inductor_ms"] = t["inductor"] * 1e3
    return out


def block(model, x, dtype, repeats):
    """``model`` compiled with bd (default options) against Inductor on ``x``."""
    model = model.to(dtype).eval()
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = ref_model(x.double())
        torch._dynamo.reset()
        ind = torch.compile(entry("inductor"), backend="inductor")
        y_ind = ind(model, x)
        with bdpass.collect_reports() as rep:
            bd = torch.compile(entry("bd"), backend="bd")
            y_bd = bd(model, x)
        t = interleaved({"bd": lambda: bd(model, x), "inductor": lambda: ind(model, x)}, repeats)
        torch._dynamo.reset()
    return {"ratio": t["inductor"] / t["bd"], "ms_bd": t["bd"] * 1e3, "ms_inductor": t["inductor"] * 1e3,
            "err_bd": rel(y_bd, ref), "err_inductor": rel(y_ind, ref),
            "rewrites": [{"kind": r.kind, "site": r.site, "form": r.details.get("form"), "cond": r.cond}
                         for r in rep.rewrites],
            "skipped": [f"{s.kind} {s.site}: {s.reason}" for s in rep.skipped]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,256,1024,4096")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--what", default="projection,block,pifa")
    p.add_argument("--block-tokens", default=None,
                   help="token counts for the blocks (default: --tokens; attention grows as tokens^2)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    block_tokens = [int(t) for t in (a.block_tokens or a.tokens).split(",")]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    what = a.what.split(",")
    rec = {"machine": timing.machine(torch.device("cpu")), "platform": platform.platform(),
           "torch": torch.__version__, "command": " ".join(["python"] + sys.argv),
           "projection": [], "block": [], "pifa": []}

    def save():
        if a.out:
            os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(rec, f, indent=1)

    warm_compiler()             # no measured function is the first one compiled (_bench)
    print(rec["machine"])
    for dt in dtypes:
        dname = str(dt).replace("torch.", "")
        for M in sorted(set(tokens) | (set(block_tokens) if "block" in what else set())):
            if "projection" in what and M in tokens:
                r = projection(M, dt, a.repeats)
                rec["projection"].append({"M": M, "dtype": dname, **r})
                print(f"kv_b_proj {dname} M={M}: " + ", ".join(
                    f"{k} {v['ratio']:.2f}x (cond {v['cond']:.3g})" for k, v in r.items() if isinstance(v, dict)))
                save()
            if "block" in what and M in block_tokens:
                for name, model in (("mla_v2_lite", MLA()), ("mla_latent512", MLA(hidden=512))):
                    init_(model)
                    x = torch.randn(1, M, model.q_proj.in_features, dtype=dt)
                    r = block(model, x, dt, a.repeats)
                    r.update(name=name, M=M, dtype=dname, ideal=model.ideal(M))
                    rec["block"].append(r)
                    forms = sorted({f"{x['kind']}:{x['form']}" for x in r["rewrites"]})
                    print(f"{name} {dname} M={M}: {r['ratio']:.2f}x (ideal {r['ideal']:.2f}x), "
                          f"err bd {r['err_bd']:.2e} inductor {r['err_inductor']:.2e}; {forms or r['skipped'][:2]}")
                    save()
            if "pifa" in what and M in tokens:
                r = block(init_(LowRank(2048, 1024)), torch.randn(M, 2048, dtype=dt), dt, a.repeats)
                r.update(M=M, dtype=dname)
                rec["pifa"].append(r)
                print(f"pifa d=2048 r=1024 {dname} M={M}: {r['ratio']:.2f}x, applied "
                      f"{[x['kind'] for x in r['rewrites']] or r['skipped']}, "
                      f"err bd {r['err_bd']:.2e} inductor {r['err_inductor']:.2e}")
                save()
    save()
    if a.plot:
        plot(rec, a.plot)


def plot(rec, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    dts = sorted({r["dtype"] for r in rec["projection"] + rec["block"]})
    fig, axes = plt.subplots(1, max(len(dts), 1), figsize=(6 * max(len(dts), 1), 4), squeeze=False)
    for ax, dt in zip(axes[0], dts):
        proj = [r for r in rec["projection"] if r["dtype"] == dt]
        for form in ("shared", "groups", "per_head"):
            if proj:
                ax.plot([r["M"] for r in proj], [r[form]["ratio"] for r in proj], marker="o",
                        label=f"kv_b_proj, {form} (cond {proj[0][form]['cond']:.3g})")
        for name in sorted({r["name"] for r in rec["block"]}):
            rows = [r for r in rec["block"] if r["dtype"] == dt and r["name"] == name]
            ax.plot([r["M"] for r in rows], [r["ratio"] for r in rows], marker="s", linestyle="--",
                    label=f"{name} block (bd default)")
        pif = [r for r in rec["pifa"] if r["dtype"] == dt]
        if pif:
            ax.plot([r["M"] for r in pif], [r["ratio"] for r in pif], marker="^", linestyle=":",
                    label="PIFA d=2048 r=1024")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed vs Inductor (x)")
        ax.set_title(f"{dt}: {rec['machine'][:60]}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
