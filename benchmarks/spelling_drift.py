"""How the same models read at Dynamo level and at ATen level on the installed torch.

Run once per torch version, then compare the records:

    python benchmarks/spelling_drift.py --out drift-2.11.json       # in a torch 2.11 venv
    python benchmarks/spelling_drift.py --out drift-2.15.json       # in a torch 2.15 venv
    python benchmarks/spelling_drift.py --compare drift-2.11.json drift-2.15.json

For each model (one layer of GPT-2, Llama, DeepSeek-V2 from the zoo and a Falcon with
``new_decoder_architecture``) the record lists the distinct call targets of the Dynamo graph
(what bdpass analyses) and of the forward graph after AOTAutograd's decomposition (ATen).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

MODELS = ("gpt2", "llama", "deepseek_v2", "falcon")


def _build(name: str):
    import transformers

    import zoo

    if name == "falcon":
        cfg = transformers.AutoConfig.for_model(
            "falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=128,
            new_decoder_architecture=True, num_kv_heads=2)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval(), (torch.randint(0, 128, (1, 8)),), {}
    return zoo.build(name, layers=1)


def targets(model, args, kwargs) -> dict[str, list[str]]:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    dynamo, aten = set(), set()

    def forward_compiler(gm, example_inputs):
        aten.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    inner = aot_autograd(fw_compiler=forward_compiler)

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.op in ("call_function", "call_method"):
                dynamo.add(f"{n.op[5:]}:{getattr(n.target, '__name__', n.target)}")
        return inner(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    torch._dynamo.reset()
    return {"dynamo": sorted(dynamo), "aten": sorted(aten)}


def compare(a_path: str, b_path: str) -> None:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    print(f"torch {a['torch']} -> {b['torch']}")
    for name in MODELS:
        if name not in a["models"] or name not in b["models"]:
            continue
        for level in ("dynamo", "aten"):
            x, y = set(a["models"][name][level]), set(b["models"][name][level])
            print(f"{name:12s} {level:6s} {len(x):3d} -> {len(y):3d} targets; only in {a['torch']}: "
                  f"{sorted(x - y)}; only in {b['torch']}: {sorted(y - x)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    a = p.parse_args(argv)
    if a.compare:
        compare(*a.compare)
        return 0
    warnings.simplefilter("ignore")
    rec = {"torch": torch.__version__, "models": {}}
    for name in MODELS:
        rec["models"][name] = targets(*_build(name))
    text = json.dumps(rec, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
