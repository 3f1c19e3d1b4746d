"""Per-rank weight memory of DeepSeek-V2-Lite under tensor parallelism, before and after BD,
computed from the model's shapes (nothing is loaded or run).

    python benchmarks/tp_memory.py [--dtype-bytes 2] [--tp 1 2 4 8]

Shapes (DeepSeek-V2-Lite config.json): hidden 2048, 16 heads, kv_lora_rank 512,
qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128, 27 layers, no q compression
(q_proj 2048 -> 16 x 192). For the whole-model context: vocab 102400 (embedding and lm_head
untied), layer 0 a dense MLP of 10944, layers 1-26 MoE with 64 routed + 2 shared experts of
1408 (gate/up/down each).

Tensor parallelism as the serving engines do it: heads split (q_proj, kv_b_proj
column-parallel, o_proj row-parallel), kv_a_proj_with_mqa and the norms replicated, MLP and
experts split along their intermediate dimension, embedding and lm_head along the vocabulary.

What BD changes, per head and layer (``bdpass.prepare``): ``kv_b_proj`` holds, for the K-nope
part and for the V part of each head, ``(kv_lora_rank - d_h) x d_h`` weights instead of
``kv_lora_rank x d_h`` (the ``d_h`` identity rows are not stored), plus one pivot table of
``kv_lora_rank`` int64 indices (``sel`` and ``rest``); ``B`` is folded into q_proj's nope
columns and o_proj's rows, which keep their sizes. A rank owns whole heads, so it holds
exactly ``1/TP`` of every factor and table.
"""
from __future__ import annotations

import argparse

HIDDEN, HEADS, LATENT, NOPE, ROPE, V = 2048, 16, 512, 128, 64, 128
LAYERS = 27
VOCAB, DENSE_FFN, MOE_FFN, EXPERTS, SHARED, DENSE_LAYERS = 102400, 10944, 1408, 64, 2, 1
INDEX_BYTES = 8                      # int64 pivot tables


def attention(tp: int, bd: bool) -> tuple[int, int, int]:
    """(sharded weight elements, replicated weight elements, pivot-table bytes) of one layer's
    attention on one rank."""
    h = HEADS // tp
    q = HIDDEN * h * (NOPE + ROPE)
    kv_a = HIDDEN * (LATENT + ROPE) + LATENT            # + kv_a_layernorm
    per_head_kv_b = LATENT * (NOPE + V)
    tables = 0
    if bd:
        per_head_kv_b = (LATENT - NOPE) * NOPE + (LATENT - V) * V
        tables = h * 2 * LATENT * INDEX_BYTES           # K-nope and V tables: sel + rest = LATENT indices
    o = h * V * HIDDEN
    return q + h * per_head_kv_b + o, kv_a, tables


def rest_of_model(tp: int) -> int:
    """Weight elements per rank outside attention (unchanged by BD)."""
    mlp = DENSE_LAYERS * 3 * HIDDEN * DENSE_FFN // tp
    moe = (LAYERS - DENSE_LAYERS) * ((EXPERTS + SHARED) * 3 * HIDDEN * MOE_FFN // tp + EXPERTS * HIDDEN)
    norms = LAYERS * 2 * HIDDEN + HIDDEN
    return 2 * VOCAB * HIDDEN // tp + mlp + moe + norms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype-bytes", type=int, default=2, help="bytes per weight (2: bf16)")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    a = ap.parse_args()
    b = a.dtype_bytes
    mib = 1024 ** 2
    print(f"DeepSeek-V2-Lite, {LAYERS} layers, weights at {b} bytes, per rank")
    print(f"{'TP':>3} {'heads':>5} | {'attn before':>12} {'attn after':>11} {'saved':>9} {'saved %':>8} "
          f"{'tables':>8} | {'kv_b before':>11} {'kv_b after':>10} | {'model/rank':>11} {'saved %':>8}")
    for tp in a.tp:
        if HEADS % tp:
            print(f"{tp:>3}: {HEADS} heads do not split over {tp} ranks")
            continue
        s0, r0, _ = attention(tp, False)
        s1, r1, tab = attention(tp, True)
        before = LAYERS * (s0 + r0) * b
        after = LAYERS * (s1 + r1) * b + LAYERS * tab
        kvb0 = LAYERS * HEADS // tp * LATENT * (NOPE + V) * b
        kvb1 = LAYERS * HEADS // tp * ((LATENT - NOPE) * NOPE + (LATENT - V) * V) * b + LAYERS * tab
        model = before + rest_of_model(tp) * b
        print(f"{tp:>3} {HEADS // tp:>5} | {before / mib:>8.1f} MiB {after / mib:>7.1f} MiB {(before - after) / mib:>5.1f} MiB "
              f"{100 * (before - after) / before:>7.2f}% {LAYERS * tab / mib:>4.2f} MiB | "
              f"{kvb0 / mib:>7.1f} MiB {kvb1 / mib:>6.1f} MiB | {model / 1024 ** 3:>7.2f} GiB "
              f"{100 * (before - after) / model:>7.3f}%")
    print()
    print("per head and layer: kv_b_proj K-nope + V = 512 x (128 + 128) = 131072 weights before, "
          "2 x (512 - 128) x 128 = 98304 after (-25%), plus 2 pivot tables of 512 int64 = 8 KiB")
    print("replicated on every rank (unchanged by BD): kv_a_proj_with_mqa 2048 x 576 + kv_a_layernorm 512 per layer")


if __name__ == "__main__":
    main()
