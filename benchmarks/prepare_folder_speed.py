"""Preparing a DeepSeek-V2-Lite-shaped checkpoint folder with ``bdpass prepare SRC DST``,
against copying the same files with ``cp -r``.

    python benchmarks/prepare_folder_speed.py [--layers 6] [--dtype bfloat16] [--dir /tmp/bdpass_pfs]
                                              [--tokens 16] [--repeats 3] [--out benchmarks/results/prepare_folder.json]

``--family lowrank_llama`` times a low-rank checkpoint instead (PIFA's case): Llama widths
(hidden 2048, MLP 5504, 16 heads, vocabulary 32000) with every attention and MLP linear a
rank-50% pair ``u_proj(v_proj(x))``, a custom class (:class:`LowRankLlama`).

By default the checkpoint has the real widths of DeepSeek-V2-Lite (hidden 2048, 16 heads, kv_lora_rank
512, q_lora_rank None, head dims 128/64/128, layer 0 dense with intermediate 10944, the
others MoE with 64 routed experts of width 1408 and 2 shared ones, vocabulary 102400) and
``--layers`` layers (the real model has 27: 31 GB in bfloat16), random weights. It is written
shard by shard (5 GB shards, the names and layout ``save_pretrained`` gives: a 2-layer model of
the same widths, saved, shows them), so that a checkpoint larger than memory can be made:
each tensor is drawn with the standard deviation of the 2-layer model's (norms stay ones).
Then, in
``--repeats`` interleaved rounds (medians reported), each after ``sync`` and dropping the
page cache (where allowed; the JSON says whether it was):

* ``cp -r SRC COPY`` (wall clock);
* ``bdpass.prepare_folder(SRC, DST)`` in this process (``bdpass prepare``), with the peak
  resident memory above the start (``VmHWM`` after resetting it);
* loading DST with ``AutoModelForCausalLM.from_pretrained`` after ``import bdpass``; its
  logits against the original's (both in ``--dtype``: a float64 copy of the whole model does
  not fit in memory), and greedy tokens (default cache) against the original's
  (``--no-load`` skips this, for a checkpoint larger than memory).

Per-layer times and parts come from the :class:`bdpass.prepare.FolderReport`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import bdpass  # noqa: E402
from _memory import reset_peak, status  # noqa: E402


class _Pair(torch.nn.Module):
    """A rank-r linear as an SVD-compressed checkpoint stores it: ``u(v(x))``."""

    def __init__(self, d_in: int, r: int, d_out: int):
        super().__init__()
        self.v_proj = torch.nn.Linear(d_in, r, bias=False)
        self.u_proj = torch.nn.Linear(r, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u_proj(self.v_proj(x))


class LowRankLlama(transformers.LlamaForCausalLM):
    """A Llama whose attention and MLP linears are rank-50% pairs (PIFA's case)."""

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if isinstance(lin, torch.nn.Linear):
                        setattr(parent, name, _Pair(lin.in_features, min(lin.in_features, lin.out_features) // 2,
                                                    lin.out_features))


def model_class(family: str) -> Any:
    return LowRankLlama if family == "lowrank_llama" else transformers.AutoModelForCausalLM


def model_kwargs(family: str) -> dict:
    return {} if family == "lowrank_llama" else {"experts_implementation": "eager"}


def config(layers: int, family: str = "deepseek_v2_lite") -> transformers.PretrainedConfig:
    if family == "lowrank_llama":       # Llama-2-7B's widths halved (hidden 2048, MLP 5504), 16 heads
        return transformers.AutoConfig.for_model(
            "llama", hidden_size=2048, intermediate_size=5504, num_attention_heads=16, num_key_value_heads=16,
            num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    return transformers.AutoConfig.for_model(
        "deepseek_v2", hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_hidden_layers=layers, first_k_dense_replace=1, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=1, topk_group=1,
        topk_method="greedy", vocab_size=102400, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def write_checkpoint(path: str, layers: int, dtype: torch.dtype, family: str = "deepseek_v2_lite",
                     shard_bytes: int = 5 * 10**9) -> None:
    """The ``layers``-layer checkpoint, written shard by shard (see the module docstring)."""
    from safetensors.torch import save_file

    tmp = path + ".template"
    torch.manual_seed(0)
    cls = model_class(family)
    build = getattr(cls, "from_config", None) or cls._from_config
    small = build(config(2, family), dtype=dtype, **model_kwargs(family)).eval()
    small.save_pretrained(tmp)
    del small
    template: dict[str, torch.Tensor] = {}
    from safetensors.torch import load_file
    for f in sorted(os.listdir(tmp)):
        if f.endswith(".safetensors"):
            template.update(load_file(os.path.join(tmp, f)))
    names = []           # (name, template name), in the order save_pretrained writes them
    for i in range(layers):
        src_layer = 0 if i == 0 else 1
        names += [(n.replace(f"model.layers.{src_layer}.", f"model.layers.{i}.", 1), n) for n in template
                  if n.startswith(f"model.layers.{src_layer}.")]
    names = [(n, n) for n in template if not n.startswith("model.layers.")] + names
    g = torch.Generator().manual_seed(1)
    weight_map, shard, size, k = {}, {}, 0, 0
    files = []

    def flush() -> None:
        nonlocal shard, size, k
        k += 1
        fn = f"model-{k:05d}.safetensors"
        save_file(shard, os.path.join(path, fn), metadata={"format": "pt"})
        weight_map.update({n: fn for n in shard})
        files.append(fn)
        shard, size = {}, 0

    os.makedirs(path, exist_ok=True)
    for name, like in names:
        t = template[like]
        if t.is_floating_point() and bool((t == t.flatten()[0]).all()):
            value = t.clone()
        elif t.is_floating_point():
            value = (torch.randn(t.shape, generator=g) * float(t.float().std())).to(dtype)
        else:
            value = t.clone()
        if size and size + value.numel() * value.element_size() > shard_bytes:
            flush()
        shard[name] = value
        size += value.numel() * value.element_size()
    flush()
    total = len(files)
    for i, fn in enumerate(files):          # save_pretrained's names: model-0000k-of-0000n
        new = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.rename(os.path.join(path, fn), os.path.join(path, new))
        weight_map = {n: (new if f == fn else f) for n, f in weight_map.items()}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(os.path.getsize(os.path.join(path, x)) for x in
                                                  set(weight_map.values()))}, "weight_map": weight_map}, f, indent=2)
    for f in os.listdir(tmp):
        if f == "config.json":
            with open(os.path.join(tmp, f)) as h:
                cfg = json.load(h)
            cfg["num_hidden_layers"] = layers
            with open(os.path.join(path, f), "w") as h:
                json.dump(cfg, h, indent=2)
        elif not f.endswith(".safetensors") and not f.endswith(".json.index") and f != "model.safetensors.index.json":
            shutil.copy2(os.path.join(tmp, f), os.path.join(path, f))
    shutil.rmtree(tmp)


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--family", default="deepseek_v2_lite", choices=("deepseek_v2_lite", "lowrank_llama"),
                   help="lowrank_llama: Llama widths (hidden 2048, MLP 5504) with every linear a rank-50%% pair")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--dir", default="/tmp/bdpass_pfs")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of cp -r and prepare")
    p.add_argument("--out", default=None)
    p.add_argument("--no-load", action="store_true",
                   help="skip loading the folders with from_pretrained (a checkpoint larger than memory)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the checkpoint in DIR/src between runs (written again if absent)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    src, copy_, dst = (os.path.join(a.dir, n) for n in ("src", "copy", "dst"))
    reuse = a.reuse and os.path.exists(os.path.join(src, "config.json"))
    if not reuse:
        shutil.rmtree(a.dir, ignore_errors=True)
    for d in (copy_, dst):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(a.dir, exist_ok=True)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
           "machine": platform.machine(), "threads": torch.get_num_threads(),
           "command": "python benchmarks/prepare_folder_speed.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else f"--{k.replace('_', '-')}"
               for k, v in vars(a).items() if v not in (None, False) and k != "reuse")}
    print(env)

    t0 = time.perf_counter()
    cfg = config(a.layers, a.family)
    if reuse:
        with open(os.path.join(src, "config.json")) as f:
            if json.load(f).get("num_hidden_layers") != a.layers:
                raise SystemExit(f"{src} holds another number of layers: drop --reuse")
    else:
        write_checkpoint(src, a.layers, dtype, a.family)
    write_s = time.perf_counter() - t0
    size = folder_bytes(src)
    print(f"checkpoint: {a.layers} layers, {size / 2**30:.2f} GiB, written in {write_s:.1f} s")

    cps: list[float] = []
    preps: list[float] = []
    peaks: list[Any] = []
    sizes: list[int] = []
    dropped = False
    def run_cp() -> None:
        if a.no_load:       # a checkpoint that large may not fit three times on the disk
            shutil.rmtree(dst, ignore_errors=True)
        drop_caches()
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", src, copy_], check=True)
        subprocess.run(["sync"], check=False)
        cps.append(time.perf_counter() - t0)
        shutil.rmtree(copy_)

    def run_prepare() -> Any:
        nonlocal dropped
        shutil.rmtree(dst, ignore_errors=True)
        dropped = drop_caches()
        rss0 = status("VmRSS")
        peak_ok = reset_peak()
        t0 = time.perf_counter()
        rep = bdpass.prepare_folder(src, dst, {"cost_model": False}, tokens=a.tokens,
                                    model_class=model_class(a.family), model_kwargs=model_kwargs(a.family))
        subprocess.run(["sync"], check=False)
        preps.append(time.perf_counter() - t0)
        peaks.append(status("VmHWM") - rss0 if peak_ok else None)
        sizes.append(folder_bytes(dst))
        return rep

    for r in range(a.repeats):     # interleaved, in alternating order: the shared disk's speed drifts
        if r % 2 == 0:
            run_cp()
            rep = run_prepare()
        else:
            rep = run_prepare()
            run_cp()
        print(f"round {r}: cp -r (+ sync) {cps[-1]:.1f} s, prepare (+ sync) {preps[-1]:.1f} s "
              f"({preps[-1] / cps[-1]:.2f}x); peak RSS above start {(peaks[-1] or 0) / 2**30:.2f} GiB", flush=True)
    cp_s, prep_s = statistics.median(cps), statistics.median(preps)
    peak = max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None
    print(rep)
    for path, r in rep.blocks.items():
        print(f"  {path}: " + ", ".join(f"{k} {v:.2f} s" for k, v in r.seconds.items()))
    print("timeline of the last round (s from the start):")
    for what, t0_, t1_ in rep.timeline:
        print(f"  {t0_:6.2f} - {t1_:6.2f}  {what}")
    print(f"median of {a.repeats}: prepare {prep_s:.1f} s = {prep_s / cp_s:.2f}x cp -r ({cp_s:.1f} s); "
          f"ratios per round {', '.join(f'{p / c:.2f}' for p, c in zip(preps, cps))}; peak RSS above start "
          f"{(peak or 0) / 2**30:.2f} GiB")

    # the prepared folder, loaded by transformers, against the original
    load_s = diff = same_tokens = None
    if not a.no_load:
        t0 = time.perf_counter()
        prepared = model_class(a.family).from_pretrained(dst, **model_kwargs(a.family)).eval()
        load_s = time.perf_counter() - t0
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=g)
        with torch.no_grad():
            lp = prepared(ids).logits.float()
            tok_p = prepared.generate(ids, max_new_tokens=6, do_sample=False)
        del prepared
        original = model_class(a.family).from_pretrained(src, **model_kwargs(a.family)).eval()
        with torch.no_grad():
            lo = original(ids).logits.float()
            tok_o = original.generate(ids, max_new_tokens=6, do_sample=False)
        del original
        # a float64 copy of the whole model does not fit (8 bytes a weight): prepared against original
        diff = float((lp.double() - lo.double()).norm() / lo.double().norm())
        same_tokens = bool(torch.equal(tok_p, tok_o))
        print(f"from_pretrained(DST): {load_s:.1f} s; logits of the prepared folder against the original's "
              f"(both {a.dtype}): relative L2 {diff:.2e}; greedy tokens equal: {same_tokens}")
    per_layer = {p: {"edits": [e['kind'] for e in r.edits],
                     "refit": any((g.validation or "").startswith("shared with") for g in r.graphs),
                     "seconds": dict(r.seconds)} for p, r in rep.blocks.items()}
    out = {"environment": env, "layers": a.layers, "dtype": a.dtype, "checkpoint_bytes": size,
           "prepared_bytes": sizes[-1], "page_cache_dropped": dropped, "cp_seconds": cp_s,
           "prepare_seconds": prep_s, "ratio_to_cp": prep_s / cp_s, "cp_seconds_rounds": cps,
           "prepare_seconds_rounds": preps, "prepare_parts_seconds": rep.seconds,
           "peak_rss_above_start_bytes": peak, "from_pretrained_seconds": load_s,
           "logits_rel_diff_prepared_vs_original": diff,
           "greedy_tokens_equal": same_tokens, "read_bytes": rep.read_bytes, "copied_bytes": rep.copied_bytes,
           "reread": rep.reread, "timeline": rep.timeline, "blocks": per_layer}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    shutil.rmtree(dst, ignore_errors=True)
    if not a.reuse:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
