"""``bdpass`` command line.

    bdpass diff path/to/file.py:factory [--options key=value ...] [--dtype D] [--json [FILE]] [--html FILE]
    bdpass diff hf:gpt2 [--set key=value ...] [--options key=value ...]
    bdpass cache show | clear | path
    bdpass prepare SRC DST [--options key=value ...] [--tokens N] [--dtype D]

``factory()`` returns ``(model, args)`` or ``(model, args, kwargs)``. ``hf:<model_type>``
builds a small randomly initialised Hugging Face text model offline from
``transformers.AutoConfig.for_model(model_type, **config)`` (hidden 64, 4 heads, 2 layers,
vocab 128, intermediate 128, ``use_cache=False``; ``--set`` overrides any config key, under
its own name or an alias of the config's ``attribute_map``, e.g. GPT-2's ``n_layer``) and
feeds it ``input_ids`` of shape (batch, seq) = (2, 8). The model is run eagerly once before
compiling: a model that fails on its inputs (e.g. a config it cannot run) is reported in
one line.

``bdpass cache`` manages the timing cache of the cost model (``bdpass.timing``): ``show``
lists its entries (problem, ratio and interval of each candidate, the floors' spreads,
whether the measurement was sure, age), ``clear`` removes them, ``path`` prints the file.

``bdpass prepare`` prepares a transformers checkpoint folder (config and safetensors) layer
by layer into ``DST``, which ``AutoModelForCausalLM.from_pretrained(DST)`` loads after
``import bdpass`` (:func:`bdpass.prepare.stream.prepare_folder`; ``--options`` as for
``bdpass.prepare``, e.g. ``cost_model=true`` or ``error_budget=10``).

Values of ``--set`` / ``--options`` are parsed as int, float, bool (true/false), None
(none/null), a JSON list or object, or else kept as a string.
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
from typing import Any, Sequence

TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 128}
_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
DTYPES = ("float32", "bfloat16", "float16")


class CliError(Exception):
    pass


# ---------------------------------------------------------------------------- parsing
def parse_value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.strip()[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_pairs(items: Sequence[str] | None, flag: str) -> dict:
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CliError(f"{flag} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


# ---------------------------------------------------------------------------- targets
def load_factory(target: str) -> tuple[Any, tuple, dict]:
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise CliError(f"target {target!r}: expected path/to/file.py:factory or hf:<model_type>")
    if not os.path.isfile(path):
        raise CliError(f"target {target!r}: no such file {path!r}")
    mod_name = "_bdpass_target_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"target {target!r}: cannot import {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CliError(f"target {target!r}: {path} has no callable {name!r}")
    result = factory()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise CliError(f"target {target!r}: {name}() must return (model, args) or (model, args, kwargs)")
    model, args = result[0], result[1]
    kwargs = result[2] if len(result) == 3 else {}
    if not isinstance(args, (tuple, list)):
        args = (args,)
    return model, tuple(args), dict(kwargs or {})


def canonical_keys(config: Any, overrides: dict) -> dict:
    """``overrides`` with each key a config stores under another name (its ``attribute_map``,
    e.g. GPT-2's ``n_layer`` for ``num_hidden_layers``) renamed to the common name, so that an
    override by either name replaces the tiny default instead of losing to it."""
    amap = dict(getattr(config, "attribute_map", None) or {})
    alias_of = {stored: common for common, stored in amap.items()}
    out: dict = {}
    given: dict = {}
    for k, v in overrides.items():
        name = alias_of.get(k, k)
        if name in out and out[name] != v:
            raise CliError(f"--set {k}={v!r} conflicts with --set {given[name]}={out[name]!r} "
                           f"(both set {name})")
        out[name], given[name] = v, k
    return out


def tiny_config(model_type: str, overrides: dict) -> Any:
    """A small config for ``model_type``: TINY sizes where the config has them, then ``overrides``."""
    import transformers

    try:
        base = transformers.AutoConfig.for_model(model_type)
    except (ValueError, KeyError) as e:
        raise CliError(f"hf:{model_type}: unknown model type ({e})") from None
    kw: dict[str, Any] = {k: v for k, v in TINY.items() if hasattr(base, k)}
    for k in _FFN_KEYS:
        if hasattr(base, k):
            kw[k] = 128
            break
    if hasattr(base, "use_cache"):
        kw["use_cache"] = False
    overrides = canonical_keys(base, overrides)
    kw.update(overrides)
    heads = kw.get("num_attention_heads")
    if heads and hasattr(base, "num_key_value_heads") and "num_key_value_heads" not in overrides:
        kw["num_key_value_heads"] = heads
    if heads and hasattr(base, "head_dim") and "head_dim" not in overrides and kw.get("hidden_size"):
        kw["head_dim"] = kw["hidden_size"] // heads
    try:
        return transformers.AutoConfig.for_model(model_type, **kw)
    except Exception as e:
        raise CliError(f"hf:{model_type}: invalid config {kw} ({type(e).__name__}: {e})") from None


def build_hf(model_type: str, overrides: dict, seed: int = 0, batch: int = 2,
             seq: int = 8) -> tuple[Any, tuple, dict]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = tiny_config(model_type, overrides)
    model = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            for attn in ("sdpa", None):
                try:
                    kw = {"attn_implementation": attn} if attn else {}
                    model = auto.from_config(cfg, **kw)
                    break
                except ValueError:
                    continue
            if model is not None:
                break
    if model is None:
        raise CliError(f"hf:{model_type}: transformers has no model class for this config")
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params:
        main = next(iter(params), "?")
        raise CliError(f"hf:{model_type} builds {type(model).__name__}, whose main input is {main!r}; "
                       f"hf: targets support text models taking input_ids only - write a factory file "
                       f"(path.py:factory) for this model")
    g = torch.Generator().manual_seed(seed + 1)
    vocab = int(getattr(cfg, "vocab_size", 128) or 128)
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        kwargs["decoder_input_ids"] = torch.randint(0, vocab, (batch, max(seq // 2, 1)), generator=g)
    return model.eval(), (), kwargs


def _cast(x: Any, dtype: Any) -> Any:
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cast(v, dtype) for v in x)
    return x


def run_eagerly(model: Any, args: tuple, kwargs: dict, target: str) -> None:
    """Run the model once without compiling; a failure becomes one line (CliError) instead
    of a traceback through Dynamo."""
    import torch

    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:       # any failure of the user's model: report it, do not compile
        what = "with this config" if target.startswith("hf:") else "on the factory's inputs"
        msg = " ".join(str(e).split()) or "(no message)"
        if len(msg) > 300:
            msg = msg[:297] + "..."
        raise CliError(f"{target}: the model fails {what}, before any compilation "
                       f"({type(e).__name__}: {msg})") from None


# ---------------------------------------------------------------------------- commands
def _diff_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "diff", help="show the graph before/after the bd backend, with numerics",
        description="Compile a model with the bd backend and show each graph before and after, "
                    "aligned by provenance, with per-node errors against float64, the per-rule "
                    "table and the costs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  bdpass diff model.py:make --options lowering=aot_eager\n"
               "  bdpass diff hf:gpt2 --set num_hidden_layers=1 --html gpt2.html\n"
               "  bdpass diff hf:llama --dtype bfloat16 --json out.json")
    p.add_argument("target", help="path/to/file.py:factory or hf:<model_type>")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="hf: config override (repeatable)")
    p.add_argument("--options", action="append", metavar="KEY=VALUE",
                   help="bd backend option, e.g. error_budget=10 or lowering=aot_eager (repeatable)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="cast the model and its floating inputs (hf: default float32)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the diff as JSON to FILE, or to stdout instead of the text")
    p.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    p.add_argument("--context", type=int, default=3,
                   help="unchanged nodes shown around each change in the text (default 3)")
    p.add_argument("--full", action="store_true", help="show every node in the text")
    p.add_argument("--width", type=int, default=100, help="text width (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of hf: weights and inputs")
    p.add_argument("--batch", type=int, default=2, help="hf: batch size (default 2)")
    p.add_argument("--seq", type=int, default=8, help="hf: sequence length (default 8)")
    return p


def cmd_diff(ns: argparse.Namespace) -> int:
    import torch

    from .diff import diff

    options = parse_pairs(ns.options, "--options")
    if ns.target.startswith("hf:"):
        model_type = ns.target[3:]
        if not model_type:
            raise CliError("hf: target needs a model type, e.g. hf:gpt2")
        model, args, kwargs = build_hf(model_type, parse_pairs(ns.sets, "--set"), ns.seed,
                                       ns.batch, ns.seq)
    else:
        if ns.sets:
            raise CliError("--set applies to hf: targets only")
        model, args, kwargs = load_factory(ns.target)
    if ns.dtype is not None:
        dtype = getattr(torch, ns.dtype)
        if isinstance(model, torch.nn.Module):
            model = model.to(dtype)
        args, kwargs = _cast(args, dtype), _cast(kwargs, dtype)
    run_eagerly(model, args, kwargs, ns.target)
    try:
        d = diff(model, *args, options=options or None, **kwargs)
    except (TypeError, ValueError) as e:
        if "bdpass:" in str(e):
            raise CliError(str(e)) from None
        raise
    if ns.html:
        d.save_html(ns.html)
        print(f"bdpass: wrote {ns.html}", file=sys.stderr)
    if ns.json is not None and ns.json != "-":
        with open(ns.json, "w", encoding="utf-8") as f:
            f.write(d.to_json())
        print(f"bdpass: wrote {ns.json}", file=sys.stderr)
    if ns.json == "-":
        sys.stdout.write(d.to_json() + "\n")
    else:
        sys.stdout.write(d.to_text(width=ns.width, context=None if ns.full else ns.context) + "\n")
    return 0


def _cache_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "cache", help="show or clear the timing cache of the cost model",
        description="The cost model's timing cache ($BDPASS_CACHE_DIR/timings.json, default "
                    "~/.cache/bdpass): measured ratios of each site shape's candidate lowerings.")
    p.add_argument("action", choices=("show", "clear", "path"),
                   help="show: list the entries; clear: remove them; path: print the file")
    return p


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _problem_summary(problem: dict) -> str:
    dtype = str(problem.get("dtype", "?")).replace("torch.", "")
    dims = [f"{k}={problem[k]}" for k in ("M", "d_in", "r", "d_out") if k in problem]
    extra = [k for k in ("bias",) if problem.get(k)]
    if problem.get("restore_order") is False:
        extra.append("order absorbed")
    return " ".join([str(problem.get("op", "?")), dtype] + dims + extra)


def cache_lines(data: dict, now: float | None = None) -> list[str]:
    """One line per cache entry (see ``bdpass cache show``)."""
    import time

    from . import timing

    now = time.time() if now is None else now
    lines = []
    for k in sorted(data):
        machine, sep, rest = k.partition(" | {")
        try:
            problem = json.loads("{" + rest) if sep else {}
        except ValueError:
            problem = {}
        head = f"{_problem_summary(problem) if problem else k}  [{machine}]"
        value = data[k]
        m, why = timing.parse_entry(value, problem or None)
        if not isinstance(value, dict) or value.get("format") != timing.FORMAT:
            lines.append(f"{head}: {why}, not trusted (measured again when used)")
            continue
        try:
            verdicts = {n: timing.Verdict.from_json(v) for n, v in value["verdicts"].items()}
            stats = value.get("stats", {})
            age = _age(now - float(value["measured_at"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            lines.append(f"{head}: unreadable entry ({type(e).__name__}), not trusted")
            continue
        parts = [f"{n} {v.ratio:.2f}x [{v.lo:.2f}-{v.hi:.2f}] {v.state}" for n, v in verdicts.items()]
        names = sorted(stats, key=lambda n: (n != timing.BASELINE, n))
        spreads = ", ".join(f"{n} {100 * timing.spread(stats[n]):.0f}%" for n in names
                            if isinstance(stats[n], dict) and "min" in stats[n] and "q25" in stats[n])
        sure = "sure" if value.get("final") else "unsure (measured again by the next process)"
        status = sure if m is not None or not value.get("final") else f"stale: {why}"
        lines.append(f"{head}: {'; '.join(parts) or 'no comparison'}; spread {spreads or '-'}; "
                     f"{status}; age {age}")
    return lines


def cmd_cache(ns: argparse.Namespace) -> int:
    from . import timing

    path = timing.cache_path()
    if ns.action == "path":
        print(path)
        return 0
    if ns.action == "clear":
        n = timing.clear()
        print(f"bdpass: removed {n} entr{'y' if n == 1 else 'ies'} from {path}")
        return 0
    data = timing.entries()
    print(f"{path}: {len(data)} entr{'y' if len(data) == 1 else 'ies'}")
    for line in cache_lines(data):
        print("  " + line)
    return 0


def _prepare_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "prepare", help="prepare a transformers checkpoint folder layer by layer",
        description="Read a transformers checkpoint folder (config.json, safetensors) and write the "
                    "prepared folder, one block of the layer stack at a time; load it with "
                    "AutoModelForCausalLM.from_pretrained(DST) after import bdpass.")
    p.add_argument("src", help="checkpoint folder to read")
    p.add_argument("dst", help="folder to write (new or empty)")
    p.add_argument("--options", action="append", metavar="KEY=VALUE",
                   help="prepare option, e.g. error_budget=10, cost_model=true, share_analysis=false (repeatable)")
    p.add_argument("--tokens", type=int, default=16, help="length of the example token ids (default 16)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype to compute in while preparing (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the example token ids")
    return p


def cmd_prepare(ns: argparse.Namespace) -> int:
    import torch

    from .prepare.stream import prepare_folder

    options = parse_pairs(ns.options, "--options")
    try:
        rep = prepare_folder(ns.src, ns.dst, options or None, tokens=ns.tokens, seed=ns.seed,
                             dtype=getattr(torch, ns.dtype) if ns.dtype else None)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise CliError(" ".join(str(e).split())) from None
    print(rep)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bdpass", description="bdpass: tools for the bd torch.compile backend")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _diff_parser(sub)
    _cache_parser(sub)
    _prepare_parser(sub)
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        if ns.command == "diff":
            return cmd_diff(ns)
        if ns.command == "cache":
            return cmd_cache(ns)
        if ns.command == "prepare":
            return cmd_prepare(ns)
    except CliError as e:
        print(f"bdpass {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
