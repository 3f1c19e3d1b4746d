"""Prepare a transformers model once, save it, load it without factorizing, generate.

    python examples/prepare_deploy.py [--out /tmp/bd-deepseek]

Builds a small DeepSeek-V2 (MLA attention, mixture-of-experts blocks) from a config with
random weights, prepares it with ``bdpass.prepare`` (the model's own modules are edited:
``kv_b_proj`` becomes a ``BDLinear``, the query and output projections get ``B`` folded in),
saves it with ``save_pretrained``, loads it back with transformers' own ``from_pretrained``
(``import bdpass`` registers bdpass as a transformers quantization method), compares the
logits of the original and of the loaded model with a float64 run of the original, and checks
that the greedy tokens equal the original model's, eagerly and under ``torch.compile``.

Then the same from a checkpoint folder, as a user with a downloaded checkpoint would: the
original is saved with ``save_pretrained``, ``bdpass.prepare_folder(src, dst)`` (the
``bdpass prepare SRC DST`` command) prepares the folder block by block without loading the
model whole, and ``from_pretrained(dst)`` loads it: its logits and greedy tokens are compared
with the original's too. See docs/prepare.md.
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch
import transformers

import bdpass


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def build() -> transformers.PreTrainedModel:
    cfg = transformers.AutoConfig.for_model(
        "deepseek_v2", hidden_size=256, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
        q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_hidden_layers=2,
        first_k_dense_replace=1, intermediate_size=512, moe_intermediate_size=128, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1, topk_method="greedy",
        vocab_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, experts_implementation="eager").eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    a = p.parse_args()

    model = build()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))

    bdpass.prepare(model, ids)                  # in place; inplace=False prepares a copy
    print(model.bdpass_report)

    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or tmp
        model.save_pretrained(out)              # factors + the plan in config.json["quantization_config"]
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")

    gen = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        lo, ll = original(ids).logits.double(), loaded(ids).logits.double()
        ref64 = copy.deepcopy(original).double()(ids).logits
    print(f"logits: relative L2 error against a float64 run: original {_rel(lo, ref64):.2e}, "
          f"prepared and loaded {_rel(ll, ref64):.2e}")
    with torch.no_grad():
        ref = original.generate(ids, **gen)
        eager = loaded.generate(ids, **gen)
        loaded.forward = torch.compile(loaded.forward, backend="inductor")
        compiled = loaded.generate(ids, **gen)
    print("greedy tokens equal to the original's: eager", torch.equal(eager, ref), "| compiled",
          torch.equal(compiled, ref))
    print(f"parameter bytes: {bdpass.prepare.state_bytes(original):,} -> {bdpass.prepare.state_bytes(loaded):,}")

    # the same from a checkpoint folder: prepared block by block, never whole in memory
    with tempfile.TemporaryDirectory() as tmp:
        original.save_pretrained(f"{tmp}/src")
        rep = bdpass.prepare_folder(f"{tmp}/src", f"{tmp}/dst", model_kwargs={"experts_implementation": "eager"})
        print(rep)
        folder = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/dst", experts_implementation="eager")
        with torch.no_grad():
            lf = folder(ids).logits.double()
            toks = folder.generate(ids, **gen)
    print(f"from the prepared folder: logits error against float64 {_rel(lf, ref64):.2e}; greedy tokens equal to "
          f"the original's: {torch.equal(toks, ref)}")


if __name__ == "__main__":
    main()
