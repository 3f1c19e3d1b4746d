"""The plot written beside the JSON: speed ratio against M, and the MLA block against
prefill length (matplotlib is optional: without it the JSON says why there is no plot)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .targets import FLOOR_RATIO, KV_LARGE_M, KV_LARGE_RATIO, KV_SMALL_M, KV_SMALL_RATIO, measured


def write_plot(data: dict, path: Path) -> tuple[Optional[str], str]:
    """Speed ratio against M (K/V projection, decode module, PIFA) and against prefill
    length (MLA block, with the FLOP model's ideal). Returns (path or None, note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is optional
        return None, f"no plot: matplotlib unavailable ({type(e).__name__}: {e})"
    try:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        groups: dict[str, list] = {}
        for sec, label in (("bd_kv_projection", "K/V proj"), ("bd_kv_module", "decode step"),
                           ("pifa_layer", "PIFA layer")):
            for e in measured(data, sec):
                key = f"{label} {e['heads']}h {e['dtype']}" if "heads" in e else f"{label} {e['dtype']}"
                groups.setdefault(key, []).append((e["M"], e["ratio_vs_inductor"]))
        for key, pts in sorted(groups.items()):
            pts.sort()
            style = "--" if key.startswith("decode") else (":" if key.startswith("PIFA") else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=key)
        ax.set_xscale("log", base=2)
        for y, txt in ((KV_LARGE_RATIO, f"target K/V M>={KV_LARGE_M}, PIFA"), (KV_SMALL_RATIO, f"target K/V M<={KV_SMALL_M}"),
                       (FLOOR_RATIO, "floor"), (1.0, "")):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 1.0 else "--")
            if txt:
                ax.text(0.01, y, txt, fontsize=7, va="bottom", color="grey", transform=ax.get_yaxis_transform())
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("Inductor time / bd time")
        ax.set_title(f"bd vs Inductor: {data.get('device')}")
        if groups:
            ax.legend(fontsize=7)
        mla: dict[str, list] = {}
        for e in measured(data, "mla_block"):
            mla.setdefault(e["dtype"], []).append((e["tokens"], e["ratio_vs_inductor"], e.get("ideal_gain")))
        for dt, pts in sorted(mla.items()):
            pts.sort()
            line, = ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"MLA block {dt}")
            if all(p[2] for p in pts):
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], ":", marker="x", color=line.get_color(),
                         label=f"FLOP-model ideal {dt}")
        ax2.axhline(1.0, color="grey", lw=0.8)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("prefill tokens")
        ax2.set_title("MLA block (DeepSeek-V2-Lite shapes)")
        if mla:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path), "written"
    except Exception as e:
        return None, f"no plot: plotting failed ({type(e).__name__}: {e})"
