"""Parameter bytes before/after ``bdpass.prepare`` and how long preparing takes.

    python benchmarks/prepare_figures.py [--layers 4] [--tokens 64] [--repeats 3] [--which mla,lowrank]

(a) ``mla``: a DeepSeek-V2-Lite-shaped attention stack (transformers ``deepseek_v2``:
    hidden 2048, 16 heads, kv_lora_rank 512, q_lora_rank None, qk_nope/rope/v head dims
    128/64/128), ``--layers`` decoder layers, all dense (``first_k_dense_replace``) with a
    small MLP (intermediate 256) and a small vocabulary (1024), so the figures are about
    attention.
(b) ``lowrank``: one Llama-shaped decoder layer (hidden 2048, intermediate 5632, 32 heads,
    4 key/value heads: TinyLlama's shape) in which every linear is replaced by a rank-50%
    pair ``Sequential(Linear(d_in, r, bias=False), Linear(r, d_out))``, r = min(d_in, d_out)/2;
    vocabulary 1024.

Both in float32 on CPU with random weights, options ``{"cost_model": False}`` (every legal
rewrite). Reported: bytes of all parameters and buffers (each tensor once) of the model and
of the prepared module; the weights the rewritten sites read before and after (from the
report); wall-clock time of ``prepare()`` (Dynamo capture + factorization + building the
module), of ``save_prepared`` and of ``load_prepared`` into a fresh model (no factorization).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import transformers

import bdpass

OPTIONS = {"cost_model": False}


def state_bytes(module: torch.nn.Module) -> int:
    seen = {}
    for t in module.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def mla_model(layers: int, seed: int) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v2", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, num_hidden_layers=layers, first_k_dense_replace=layers,
        intermediate_size=256, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, vocab_size=1024, max_position_embeddings=4096, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                              dtype=torch.float32)
    return model.eval()


def lowrank_llama_layer(seed: int) -> torch.nn.Module:
    cfg = transformers.AutoConfig.for_model(
        "llama", hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=4, num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096,
        use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa",
                                                              dtype=torch.float32)
        layer = model.model.layers[0]
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    r = min(lin.in_features, lin.out_features) // 2
                    pair = torch.nn.Sequential(torch.nn.Linear(lin.in_features, r, bias=False),
                                       torch.nn.Linear(r, lin.out_features))
                    setattr(parent, name, pair)
    return model.eval()


def figures(name: str, build, tokens: int, repeats: int) -> None:
    model = build(0)
    ids = torch.randint(0, 1024, (1, tokens), generator=torch.Generator().manual_seed(0))
    before = state_bytes(model)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepared = bdpass.prepare(model, ids, options=OPTIONS)
        times.append(time.perf_counter() - t0)
    after = state_bytes(prepared)
    with torch.no_grad():
        ref = model(ids).logits
        got = prepared(ids).logits
    rel = float(torch.linalg.vector_norm(got.double() - ref.double()) / torch.linalg.vector_norm(ref.double()))
    rep = prepared.report
    kinds: dict[str, int] = {}
    for r in rep.rewrites:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    sites_before = sum(r.params_before for r in rep.rewrites) * 4
    sites_after = sum(r.params_after for r in rep.rewrites) * 4
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.safetensors")
        t0 = time.perf_counter()
        bdpass.save_prepared(prepared, path)
        t_save = time.perf_counter() - t0
        size = os.path.getsize(path)
        fresh = build(1)
        t0 = time.perf_counter()
        loaded = bdpass.load_prepared(fresh, path, ids)
        t_load = time.perf_counter() - t0
        with torch.no_grad():
            same = torch.equal(loaded(ids).logits, got)
    mib = 2 ** 20
    print(f"[{name}] rewrites: {', '.join(f'{k} x{v}' for k, v in sorted(kinds.items())) or 'none'}; "
          f"skipped {len(rep.skipped)}")
    print(f"  parameter+buffer bytes: model {before / mib:,.2f} MiB -> prepared {after / mib:,.2f} MiB "
          f"({100 * (before - after) / before:.1f}% less)")
    print(f"  rewritten sites' weights: {sites_before / mib:,.2f} MiB -> {sites_after / mib:,.2f} MiB "
          f"({100 * (sites_before - sites_after) / max(sites_before, 1):.1f}% less)")
    print(f"  prepare() {statistics.median(times):.2f} s (median of {repeats}: "
          f"{', '.join(f'{t:.2f}' for t in times)} s)")
    print(f"  save_prepared {t_save:.2f} s ({size / mib:,.2f} MiB file); "
          f"load_prepared {t_load:.2f} s (no factorization); loaded == prepared: {same}")
    print(f"  prepared vs original logits: relative L2 {rel:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the MLA stack")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--which", default="mla,lowrank")
    p.add_argument("--repeats", type=int, default=3, help="prepare() calls timed per model")
    a = p.parse_args()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, bdpass {bdpass.__version__}, "
          f"{torch.get_num_threads()} threads, float32 CPU, batch 1 x {a.tokens} tokens, options {OPTIONS}")
    which = a.which.split(",")
    if "mla" in which:
        figures(f"mla x{a.layers}", lambda seed: mla_model(a.layers, seed), a.tokens, a.repeats)
    if "lowrank" in which:
        figures("lowrank llama layer", lowrank_llama_layer, a.tokens, a.repeats)


if __name__ == "__main__":
    main()
