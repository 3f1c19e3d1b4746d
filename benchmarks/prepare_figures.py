"""Weights before/after ``bdpass.prepare``, time to prepare and to load, peak memory while
preparing.

    python benchmarks/prepare_figures.py [--layers 3] [--tokens 64] [--which mla,lowrank] [--threads 1]
                                         [--options '{"share_analysis": false}']
                                         [--out benchmarks/results/prepare_figures.json]

(a) ``mla``: a DeepSeek-V2-Lite-shaped model (transformers ``deepseek_v2``) with the real
    widths: hidden 2048, 16 heads, kv_lora_rank 512, q_lora_rank None, qk_nope/rope/v head
    dims 128/64/128; layer 0 dense (intermediate 10944), the others MoE blocks of the real
    size (64 routed experts of width 1408, 6 per token, 2 shared experts; transformers'
    "eager" experts: a loop over the experts that were hit, so the forward has graph breaks).
    ``--layers`` layers (the model has 27; one MoE layer holds 2.3 GB of float32 weights, so
    a CPU machine fits a few). Vocabulary 1024 instead of 102400: the embedding and head are
    not rewritten, and the figures are per layer.
(b) ``lowrank``: one Llama decoder layer of TinyLlama's shape (hidden 2048, intermediate
    5632, 32 heads, 4 key/value heads) in which every linear is a rank-50% pair
    ``Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))``, r = min(d_in, d_out)/2;
    vocabulary 1024.

Float32, CPU, random weights, options ``{"cost_model": False}`` (every legal rewrite),
batch 1 x ``--tokens`` tokens. Reported per model:

* parameter and buffer bytes of the model before and after ``prepare`` (each storage once),
  and of the weights the rewritten sites read before and after (from the report);
* ``prepare`` wall-clock time (an eager run counting reads, the compiled run with the
  analysis, factorization, float64 validation and module edits), per layer, and its parts;
* peak resident memory during ``prepare`` above the resident memory just before it (Linux
  ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; a tiny model is prepared
  first so that importing Dynamo and the ops is not counted, but Dynamo's tracing of this
  model is), next to the model's bytes and the largest layer's weights in float64;
* time to load: ``load_prepared`` (safetensors) into a freshly built model, and for (a)
  ``bdpass.from_pretrained`` of a ``save_pretrained`` directory; both compared bit for bit
  with the prepared model's logits;
* relative L2 error of the prepared model's logits against the original's.

Timings are wall-clock on whatever else the machine is running (the 1-minute load average
at start and end is recorded).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import reset_peak, status  # noqa: E402

import bdpass
from bdpass.prepare import state_bytes

OPTIONS = {"cost_model": False}
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
VOCAB = 1024
MIB = 2 ** 20


def mla_model(layers: int, seed: int) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v2", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_hidden_layers=layers, first_k_dense_replace=1, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
        topk_method="greedy", vocab_size=VOCAB, max_position_embeddings=4096, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32,
                                                              experts_implementation="eager")
    return model.eval()


def lowrank_llama_layer(seed: int) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
        num_hidden_layers=1, vocab_size=VOCAB, max_position_embeddings=4096, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
        layer = model.model.layers[0]
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    r = min(lin.in_features, lin.out_features) // 2
                    setattr(parent, name, torch.nn.Sequential(torch.nn.Linear(lin.in_features, r, bias=False),
                                                              torch.nn.Linear(r, lin.out_features)))
    return model.eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def _warm_up() -> None:
    """Prepare a tiny model first, so that the memory and time measured below do not include
    importing and initialising Dynamo, scipy and the ops."""
    tiny = torch.nn.Sequential(torch.nn.Linear(32, 8, bias=False), torch.nn.Linear(8, 32)).eval()
    bdpass.prepare(tiny, torch.randn(4, 32), options=OPTIONS)


def figures(name: str, build, n_layers: int, tokens: int, pretrained: bool, load_kwargs: dict | None = None) -> dict:
    load_kwargs = load_kwargs or {}
    model = build(0)
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))
    before = state_bytes(model)
    largest_layer64 = 2 * max(state_bytes(layer) for layer in model.model.layers)
    ref = _logits(model, ids)
    gc.collect()
    rss0 = status("VmRSS")
    peak_ok = reset_peak()
    t0 = time.perf_counter()
    bdpass.prepare(model, ids, options=OPTIONS)
    t_prepare = time.perf_counter() - t0
    peak = status("VmHWM") - rss0 if peak_ok else None
    rep = model.bdpass_report
    after = state_bytes(model)
    got = _logits(model, ids)
    kinds: dict[str, int] = {}
    for e in rep.edits:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    sites_before = sum(e["params_before"] for e in rep.edits) * 4
    sites_after = sum(e["params_after"] for e in rep.edits) * 4
    out = {"model": name, "layers": n_layers, "tokens": tokens, "prepared": kinds,
           "not_preparable": [b.line() for b in rep.not_preparable],
           "skipped_by_analysis": len(rep.skipped), "graphs_compiled": rep.graphs_compiled,
           "bytes_before": before, "bytes_after": after,
           "sites_bytes_before": sites_before, "sites_bytes_after": sites_after,
           "prepare_seconds": t_prepare, "prepare_seconds_per_layer": t_prepare / n_layers,
           "prepare_parts_seconds": dict(rep.seconds),
           "peak_rss_above_start_bytes": peak, "largest_layer_float64_bytes": largest_layer64,
           "rel_l2_logits_vs_original": _rel(got, ref)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.safetensors")
        t0 = time.perf_counter()
        bdpass.save_prepared(model, path)
        out["save_prepared_seconds"] = time.perf_counter() - t0
        out["file_bytes"] = os.path.getsize(path)
        if pretrained:
            model.save_pretrained(os.path.join(d, "hf"))
        cls = type(model)
        del model, rep
        gc.collect()
        fresh = build(1)
        t0 = time.perf_counter()
        bdpass.load_prepared(fresh, path)
        out["load_prepared_seconds"] = time.perf_counter() - t0
        out["load_prepared_equal"] = bool(torch.equal(_logits(fresh, ids), got))
        del fresh
        gc.collect()
        if pretrained:
            t0 = time.perf_counter()
            loaded = bdpass.from_pretrained(cls, os.path.join(d, "hf"), **load_kwargs)
            out["from_pretrained_seconds"] = time.perf_counter() - t0
            out["from_pretrained_equal"] = bool(torch.equal(_logits(loaded, ids), got))
            del loaded
            gc.collect()
    return out


def _print(r: dict) -> None:
    b, a = r["bytes_before"], r["bytes_after"]
    sb, sa = r["sites_bytes_before"], r["sites_bytes_after"]
    print(f"[{r['model']}] {r['layers']} layer(s), {r['graphs_compiled']} graphs; prepared "
          f"{', '.join(f'{k} x{v}' for k, v in sorted(r['prepared'].items())) or 'nothing'}; "
          f"{len(r['not_preparable'])} not preparable, {r['skipped_by_analysis']} skipped by the analysis")
    print(f"  parameter+buffer bytes {b / MIB:,.1f} MiB -> {a / MIB:,.1f} MiB ({100 * (b - a) / b:.2f}% less); "
          f"rewritten sites' weights {sb / MIB:,.1f} -> {sa / MIB:,.1f} MiB ({100 * (sb - sa) / max(sb, 1):.1f}% less)")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in r["prepare_parts_seconds"].items())
    print(f"  prepare {r['prepare_seconds']:.2f} s = {r['prepare_seconds_per_layer']:.2f} s/layer ({parts})")
    if r["peak_rss_above_start_bytes"] is not None:
        print(f"  peak RSS during prepare: +{r['peak_rss_above_start_bytes'] / MIB:,.0f} MiB above the start "
              f"(model {b / MIB:,.0f} MiB, largest layer in float64 {r['largest_layer_float64_bytes'] / MIB:,.0f} MiB)")
    line = (f"  save_prepared {r['save_prepared_seconds']:.2f} s ({r['file_bytes'] / MIB:,.1f} MiB); "
            f"load_prepared {r['load_prepared_seconds']:.2f} s (equal: {r['load_prepared_equal']})")
    if "from_pretrained_seconds" in r:
        line += f"; from_pretrained {r['from_pretrained_seconds']:.2f} s (equal: {r['from_pretrained_equal']})"
    print(line)
    print(f"  logits vs original: relative L2 {r['rel_l2_logits_vs_original']:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=3, help="layers of the DeepSeek-V2-Lite-shaped model")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--which", default="mla,lowrank")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--options", default=None,
                   help='JSON options for prepare, merged over {"cost_model": false} (e.g. \'{"share_analysis": false}\')')
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads (set before torch and scipy start; on a shared machine 1 avoids "
                        "the threads of the factorizations waiting on each other)")
    a = p.parse_args()
    if a.options:
        OPTIONS.update(json.loads(a.options))
    if a.threads is not None and os.environ.get("OMP_NUM_THREADS") != str(a.threads):
        env = dict(os.environ, **{k: str(a.threads) for k in _THREAD_VARS})
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "bdpass": bdpass.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
           "command": "python benchmarks/prepare_figures.py " + " ".join(
               f"--{k} {v!r}" if k == "options" else f"--{k} {v}" for k, v in vars(a).items() if v is not None)}
    env["load_average_at_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(", ".join(f"{k} {v}" for k, v in env.items()) + f"; float32 CPU, options {OPTIONS}")
    _warm_up()
    results = []
    which = a.which.split(",")
    if "mla" in which:
        results.append(figures("deepseek-v2-lite-shaped", lambda s: mla_model(a.layers, s), a.layers, a.tokens,
                               pretrained=True, load_kwargs={"experts_implementation": "eager"}))
        _print(results[-1])
    if "lowrank" in which:
        results.append(figures("low-rank llama layer", lowrank_llama_layer, 1, a.tokens, pretrained=False))
        _print(results[-1])
    env["load_average_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"load average (1 min) at start {env['load_average_at_start']}, at end {env['load_average_at_end']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
