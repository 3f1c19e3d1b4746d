"""Sweep: bd on every architecture of the installed transformers, tiny and random.

    python benchmarks/hf_sweep.py [--kind causal|encoder|seq2seq|all] [--families a,b]
                                  [--jobs 2] [--timeout 300] [--markdown docs/coverage.md]
                                  [--json out.json [--resume [--rerun a,b]]]
                                  [--options '{"cost_model": false}'] [--config '{"use_cache": false}']

Families come from the auto mappings (causal: ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``;
seq2seq: ``MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES``; encoder: the other
``MODEL_MAPPING_NAMES`` families, run through ``AutoModel`` on ``input_ids`` or
``pixel_values``). Each model is built from its default config shrunk by
``tests/hf_sweep_lib.py`` (hidden 64, 2 layers, 4 heads, ...), run eagerly in float32 and
float64, then compiled with ``torch.compile(model, backend="bd")`` (default options unless
``--options``; the model's default cache unless ``--config`` overrides it: ``--config`` is
JSON merged into every shrunk config), and judged: crash, fallback from an internal
error, output beyond rounding (bd's relative-L2 error against float64 over
``hf_sweep_lib.error_bound`` of eager float32's), an attention contraction without a verdict.

Models run in ``--jobs`` worker processes (one thread each), each model under ``--timeout``
seconds: a worker that hangs or dies is replaced and the model recorded as such. ``--json``
is rewritten after every model; ``--resume`` continues an interrupted sweep from it (same
versions and options), ``--rerun a,b`` runs those families again (the table then lists
both commands).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
sys.path.insert(0, TESTS)

MARK = "@@RESULT "
RECYCLE = 30     # models per worker process before it is replaced (bounds memory growth)


# ---------------------------------------------------------------------------- worker
def worker(options: dict | None, config: dict | None = None) -> None:
    """Read ``kind family`` lines on stdin; write one result line per model on stdout."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                      # the models' own prints go to the log, not the protocol
    sys.stdout = sys.stderr
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("HF_SWEEP_THREADS", "1")))
    import hf_sweep_lib as lib

    import faulthandler

    # where the model was when its time ran out: the parent reads this file on a timeout
    stack_path, limit = os.environ.get("HF_SWEEP_STACK"), float(os.environ.get("HF_SWEEP_TIMEOUT", "0"))
    for line in sys.stdin:
        kind, family = line.split()
        stack = open(stack_path, "w") if stack_path and limit > 0 else None
        if stack is not None:
            faulthandler.dump_traceback_later(max(1.0, limit - 5.0), file=stack)
        try:
            res = lib.check(family, kind, options=options, **(config or {}))
        except BaseException as e:     # never leave the parent waiting
            res = {"family": family, "kind": kind, "status": "crashed",
                   "reason": f"sweep harness: {type(e).__name__}: {e}"[:300]}
        finally:
            if stack is not None:
                faulthandler.cancel_dump_traceback_later()
                stack.close()
        out.write(MARK + json.dumps(res, default=str) + "\n")


def where_stuck(path: str) -> str:
    """The innermost frame of interest of a faulthandler dump: bdpass's own code, else the
    torch component (Dynamo tracing, Inductor, ...) the model was in."""
    try:
        with open(path) as f:
            frames = [ln.strip() for ln in f if ln.strip().startswith("File ")]
    except OSError:
        return ""
    for ln in frames:                  # innermost first
        if "/bdpass/" in ln:
            return "in bdpass: " + ln.split("/bdpass/", 1)[1]
    for part, name in (("torch/_inductor", "Inductor"), ("torch/_dynamo", "Dynamo tracing"),
                       ("transformers/", "the model's eager code")):
        if any(part in ln for ln in frames):
            return "in " + name
    return ""


class _Proc:
    def __init__(self, argv, env, log):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                  env=env, text=True, bufsize=1)
        self.job = None
        self.started = 0.0
        self.done = 0
        self.buf = ""

    def send(self, job):
        self.job = job
        self.started = time.monotonic()
        self.p.stdin.write(f"{job[0]} {job[1]}\n")
        self.p.stdin.flush()

    def stop(self):
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def run_all(jobs: list[tuple[str, str]], n_workers: int, timeout: float, options: dict | None,
            log_path: str | None, progress=None, on_result=None, config: dict | None = None) -> list[dict]:
    if progress is None:
        def progress(line: str) -> None:
            print(line, flush=True)
    argv = [sys.executable, os.path.abspath(__file__), "--worker"]
    if options is not None:
        argv += ["--options", json.dumps(options)]
    if config:
        argv += ["--config", json.dumps(config)]
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("BDPASS_CACHE_DIR", tempfile.mkdtemp(prefix="bdpass-sweep-cache-"))
    env["PYTHONWARNINGS"] = "ignore"
    log = open(log_path, "a") if log_path else subprocess.DEVNULL
    pending = list(jobs)
    results: dict[tuple[str, str], dict] = {}
    sel = selectors.DefaultSelector()
    procs: list[_Proc] = []

    stacks = tempfile.mkdtemp(prefix="hf-sweep-stacks-")
    counter = iter(range(1 << 30))

    def spawn() -> _Proc:
        env["HF_SWEEP_STACK"] = os.path.join(stacks, f"worker{next(counter)}.txt")
        env["HF_SWEEP_TIMEOUT"] = str(timeout)
        pr = _Proc(argv, env, log)
        pr.stack = env["HF_SWEEP_STACK"]
        sel.register(pr.p.stdout, selectors.EVENT_READ, pr)
        procs.append(pr)
        return pr

    def retire(pr: _Proc, kill: bool) -> None:
        sel.unregister(pr.p.stdout)
        procs.remove(pr)
        if kill:
            pr.p.kill()
            pr.p.wait()
        else:
            pr.stop()

    def finish(pr: _Proc, res: dict) -> None:
        results[pr.job] = res
        progress(f"[{len(results)}/{len(jobs)}] {res['kind']:8s} {res['family']:28s} {res['status']:18s} "
                 f"{res.get('seconds', 0):6.1f}s {res.get('reason', '')[:110]}")
        pr.job = None
        pr.done += 1
        if on_result is not None:
            on_result(res)

    t_start = time.monotonic()
    for _ in range(min(n_workers, len(pending))):
        spawn()
    while pending or any(pr.job for pr in procs):
        for pr in list(procs):
            if pr.job is None and pending:
                if pr.done >= RECYCLE:
                    retire(pr, kill=False)
                    pr = spawn()
                pr.send(pending.pop(0))
        now = time.monotonic()
        wait = min((pr.started + timeout - now for pr in procs if pr.job), default=1.0)
        for key, _ in sel.select(timeout=max(0.05, wait)):
            pr = key.data
            line = pr.p.stdout.readline()
            if not line:       # the worker died
                rc = pr.p.wait()
                job = pr.job
                retire(pr, kill=False)
                if job is not None:
                    pr.job = job
                    finish(pr, {"family": job[1], "kind": job[0], "status": "crashed",
                                "reason": f"the worker process died (exit status {rc})",
                                "seconds": round(time.monotonic() - pr.started, 1)})
                if pending or any(p.job for p in procs):
                    spawn()
                continue
            if line.startswith(MARK) and pr.job is not None:
                finish(pr, json.loads(line[len(MARK):]))
        now = time.monotonic()
        for pr in list(procs):
            if pr.job is not None and now - pr.started > timeout:
                job = pr.job
                retire(pr, kill=True)
                pr.job = job
                where = where_stuck(pr.stack)
                finish(pr, {"family": job[1], "kind": job[0], "status": "timeout",
                            "reason": f"no result within {timeout:g} s" + (f" (still {where})" if where else ""),
                            "seconds": round(now - pr.started, 1)})
                if pending:
                    spawn()
    for pr in list(procs):
        retire(pr, kill=False)
    progress(f"sweep: {len(jobs)} models in {time.monotonic() - t_start:.0f} s")
    return [results[j] for j in jobs]


# ---------------------------------------------------------------------------- summary
def counts(results: list[dict]) -> dict:
    st = Counter(r["status"] for r in results)
    built = [r for r in results if r["status"] != "not_built"]
    compiled = [r for r in built if r["status"] not in ("crashed", "timeout", "not_compilable")]
    return {
        "architectures": len(results), "built": len(built), "compiled": len(compiled),
        "rewritten": sum(1 for r in compiled if r.get("rewrites")),
        "crashed": st["crashed"], "timeout": st["timeout"],
        "internal_error_fallbacks": st["internal_fallback"], "wrong": st["wrong"],
        "verdicts_missing": st["verdicts_missing"], "not_compilable": st["not_compilable"],
        "not_built": st["not_built"], "ok": st["ok"],
    }


def _short_reason(reason: str) -> str:
    import re

    r = reason
    # "cost model: measured on <machine> | torch <v>, shared 0.12x, ... of the original at 24 tokens (needs ...)"
    r = re.sub(r"measured on [^|]*\| torch [^,]*, ", "measured ", r)
    r = re.sub(r" of the original at \d+ tokens", "", r)
    return r if len(r) <= 90 else r[:87] + "..."


def verdict_cell(r: dict) -> str:
    parts = [f"{k} x{n}" for k, n in sorted((r.get("rewrites") or {}).items())]
    skipped = r.get("skipped") or {}
    for kind in ("bd_qk", "bd_vo", "pifa"):
        for reason, n in sorted(skipped.get(kind, {}).items(), key=lambda kv: -kv[1]):
            parts.append(f"{kind} skipped x{n}: {_short_reason(reason)}")
    for kind, nodes in sorted((r.get("verdicts_extra") or {}).items()):
        parts.append(f"{kind} verdicts also on {len(nodes)} contraction(s) that `contractions.find_attention` "
                     f"does not count as attention ({', '.join(nodes[:4])})")
    v = r.get("verdicts") or {}
    if not parts and r["status"] not in ("not_built", "timeout", "crashed", "not_compilable") \
            and not any(v.values()):
        parts.append("no attention contraction or linear chain in the graphs")
    return "; ".join(parts).replace("|", "\\|")


def _err(x) -> str:
    return "" if x is None else f"{x:.2e}"


def markdown(results: list[dict], meta: dict) -> str:
    c = counts(results)
    lines = [
        "# Coverage: bd on every transformers architecture"
        + (" (every legal rewrite applied)" if (meta.get("options") or {}).get("cost_model") is False else ""),
        "",
        "Generated by", "", "```bash", meta["command"], "```", "",
        f"torch {meta['torch']}, transformers {meta['transformers']}, Python {meta['python']}, "
        f"{meta['machine']}; {meta['seconds']:.0f} s of wall time with {meta['jobs']} worker(s) of one thread "
        "(the machine was shared with other jobs).",
        "",
        "Each family's model is built from its own default config (`AutoConfig.for_model(name)`) "
        "shrunk by one generic rule set (`tests/hf_sweep_lib.py`: hidden 64, 2 layers (one of each "
        "layer kind, at most 4), 4 heads of 16, FFN 128, vocab 256, 4 experts top-2, MLA ranks 32/48), "
        "random weights scaled so attention is far from uniform, float32, "
        "`experts_implementation=\"eager\"` where the model supports it; batch 2, 12 tokens "
        "(seq2seq: 6 decoder tokens). It runs once eagerly, then compiled with "
        f"`torch.compile(model, backend=\"bd\"{', options=' + json.dumps(meta['options']) if meta['options'] else ''})`"
        + (f", config overrides `{json.dumps(meta['config'])}`. " if meta.get("config") else
           " (the model's default cache: K/V returned in a cache cannot be rewritten, so those sites "
           "are skipped with that reason). ")
        + ("With the cost model off, every legal rewrite is applied." + (
            " `lowering: aot_eager` runs the rewritten graph without Inductor's C++ compilation (the "
            "analysis, the rewrites and their float64 validation are the same)."
            if (meta.get("options") or {}).get("lowering") == "aot_eager" else "")
           if (meta.get("options") or {}).get("cost_model") is False else
           "With the cost model on (the default), legal rewrites "
           "that do not pay on this machine at these tiny sizes are skipped with the measured ratio."),
        "",
        "Judged per model: a crash; a fallback from an internal error (the report's "
        "`fallback`, or a validation that could not run); bd's output beyond rounding (its "
        "relative-L2 error against a float64 eager run above "
        f"max({meta['factor']:g} x eager float32's error, {meta['floor']:.1e}), the factor "
        "covering the zoo's 1.5x bd/Inductor and Inductor's own reordering); an attention "
        "contraction without a `bd_qk`/`bd_vo` verdict (checked against "
        "`bdpass.graph.contractions` as `tests/test_verdicts.py` does).",
        "",
        "| count | |", "|---|---|",
    ]
    planned = meta.get("planned")
    if planned and planned > len(results):
        lines[-2:-2] = [f"**Incomplete: {len(results)} of the {planned} architectures were swept**; the rest "
                        "continue with the same command plus `--resume` (results are kept in the `--json` file).", ""]
    labels = [("architectures", "architectures swept"), ("built", "built (config, construction and eager run work)"),
              ("compiled", "compiled by bd"), ("rewritten", "with at least one rewrite applied"),
              ("crashed", "crashed"), ("timeout", "timed out"),
              ("internal_error_fallbacks", "fell back from an internal error"),
              ("wrong", "output beyond rounding"), ("verdicts_missing", "attention without a verdict"),
              ("not_compilable", "not compilable by plain Inductor either"),
              ("not_built", "not built (reason in the table)")]
    lines += [f"| {label} | {c[k]} |" for k, label in labels]
    lines.append("")
    for kind in ("causal", "seq2seq", "encoder"):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        lines += [f"## {kind} ({len(rows)})", "",
                  "| architecture | built | status | rewrites, or why skipped | bd err | eager err |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["family"]):
            if r["status"] == "not_built":
                reason = r.get("reason", "").replace("|", "\\|")
                lines.append(f"| {r['family']} | no | not built: {reason[:160]} | | | |")
                continue
            status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('reason', '')[:160]}"
            lines.append(f"| {r['family']} | yes | {status.replace('|', chr(92) + '|')} | {verdict_cell(r)} | "
                         f"{_err(r.get('err_bd'))} | {_err(r.get('err_eager'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="all", choices=["causal", "encoder", "seq2seq", "all"])
    p.add_argument("--families", default="", help="comma-separated family names (default: every one of --kind)")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    p.add_argument("--markdown", default="", help="write the coverage table to this file")
    p.add_argument("--json", default="", help="write every result to this file")
    p.add_argument("--options", default=None, help="bd options as JSON (default: none, i.e. the defaults)")
    p.add_argument("--config", default=None, help="config overrides as JSON, e.g. '{\"use_cache\": false}'")
    p.add_argument("--log", default="", help="append the workers' stderr to this file")
    p.add_argument("--resume", action="store_true",
                   help="keep the results already in --json (written after every model) and run the rest")
    p.add_argument("--rerun", default="", help="with --resume: families to run again all the same")
    p.add_argument("--table-only", action="store_true", help="write --markdown from --json without running")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    options = json.loads(a.options) if a.options else None
    config = json.loads(a.config) if a.config else None
    if a.worker:
        worker(options, config)
        return 0
    import hf_sweep_lib as lib

    if a.table_only:
        with open(a.json) as f:
            data = json.load(f)
        data["meta"]["counts"] = counts(data["results"])
        if "planned" not in data["meta"]:
            command = data["meta"]["command"].split("\n")[0]
            kind = command.split("--kind ")[1].split()[0] if "--kind " in command else "all"
            data["meta"]["planned"] = sum(len(lib.families(k)) for k in (lib.KINDS if kind == "all" else [kind]))
        with open(a.markdown, "w") as f:
            f.write(markdown(data["results"], data["meta"]))
        print(json.dumps(data["meta"]["counts"]))
        return 0
    kinds = list(lib.KINDS) if a.kind == "all" else [a.kind]
    jobs: list[tuple[str, str]] = []
    if a.families:
        for fam in a.families.split(","):
            kind = next((k for k in kinds if fam in lib.mapping(k)), None)
            if kind is None:
                p.error(f"{fam!r} is not a {a.kind} family of this transformers")
            jobs.append((kind, fam))
    else:
        jobs = [(k, f) for k in kinds for f in lib.families(k)]
    import torch
    import transformers

    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, os.getcwd())]
                                   + (argv if argv is not None else sys.argv[1:]))
    meta = {"command": command, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "jobs": a.jobs, "seconds": 0.0, "options": options, "config": config, "planned": len(jobs),
            "factor": lib.ERROR_FACTOR, "floor": lib.ERROR_FLOOR}
    done: dict[tuple[str, str], dict] = {}
    if a.resume:
        if not (a.json and os.path.exists(a.json)):
            p.error("--resume needs an existing --json file")
        with open(a.json) as f:
            old = json.load(f)
        if (old["meta"]["torch"], old["meta"]["transformers"], old["meta"]["options"], old["meta"].get("config")) != \
                (meta["torch"], meta["transformers"], options, config):
            p.error("--resume: the --json file was written with other torch/transformers versions or options")
        rerun = set(filter(None, a.rerun.split(",")))
        done = {(r["kind"], r["family"]): r for r in old["results"] if r["family"] not in rerun}
        meta["seconds"] = old["meta"].get("seconds", 0.0)
        meta["command"] = old["meta"]["command"]
        if command not in meta["command"].split("\n"):
            meta["command"] += "\n" + command     # the runs that produced the table, in order
    todo = [j for j in jobs if j not in done]
    t0 = time.monotonic()
    base_seconds = meta["seconds"]

    def save(res=None) -> None:
        if res is not None:
            done[(res["kind"], res["family"])] = res
        if a.json:
            meta["seconds"] = base_seconds + time.monotonic() - t0
            ordered = [done[j] for j in jobs if j in done] + [r for j, r in done.items() if j not in jobs]
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": meta, "results": ordered}, f, indent=1, default=str)
            os.replace(tmp, a.json)

    run_all(todo, a.jobs, a.timeout, options, a.log or None, on_result=save, config=config)
    save()
    results = [done[j] for j in jobs if j in done]
    meta["counts"] = counts(results)
    print(json.dumps(meta["counts"]))
    save()
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(results, meta))
    bad = {"crashed", "timeout", "internal_fallback", "wrong", "verdicts_missing"}
    return 1 if any(r["status"] in bad for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
