"""Coverage-guided fuzzing (atheris) of every parser of the other side's
bytes (targets: tests/fuzz_targets.py), one target after another.

    .venv/bin/python bench/fuzz.py [--runs N] [--seconds S] [--seed K]
                                   [--targets a,b] [--work DIR] [--json FILE]

Per target: a worker process runs libFuzzer for N inputs (or S seconds),
starting from the target's seeds and keeping the inputs that found new
coverage in DIR/<target>/corpus; an exception other than the target's
one-line errors is a crash, saved (one input and traceback per distinct
place) under DIR/<target>/crashes and counted, and fuzzing goes on.  Then
the corpus is replayed under coverage.py to report the lines and branches
of the target's functions that it reached.  Exit status 1 if any crash.

    bench/fuzz.py --runs 1000000 --targets frames     the figures of issue 11
    bench/fuzz.py --worker TARGET ARGS...             (internal) one libFuzzer run
    bench/fuzz.py --replay TARGET FILE|DIR...         re-run inputs, e.g. a crash
"""
import argparse
import ast
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def load(name):
    import fuzz_targets
    target = fuzz_targets.TARGETS[name]()
    target.name = name
    target.setup()
    return target


# -- the worker: one libFuzzer run --------------------------------------------------------

def worker(name, args):
    import atheris
    import importlib

    import fuzz_targets
    with atheris.instrument_imports(include=["qubeswyng", "wyngagent"]):
        for module in fuzz_targets.MODULES:
            importlib.import_module(module)
    target = load(name)
    crashes = Path(os.environ["QWYNG_FUZZ_CRASHES"])
    seen = set()

    def one(data):
        try:
            target.run(data)
        except target.allowed:
            pass
        except Exception as e:  # the finding: record it and go on
            record(crashes, seen, e, data)
    atheris.Setup([sys.argv[0]] + args, one)
    atheris.Fuzz()


def record(crashes, seen, error, data):
    frames = traceback.extract_tb(error.__traceback__)
    where = frames[-1] if frames else None
    sig = "%s at %s:%s" % (type(error).__name__, Path(where.filename).name if where else "?",
                           where.lineno if where else 0)
    with open(crashes / "count", "a") as f:
        f.write(sig + "\n")
    if sig in seen:
        return
    seen.add(sig)
    folder = crashes / hashlib.sha1(sig.encode()).hexdigest()[:12]
    if folder.exists():
        return
    folder.mkdir(parents=True)
    (folder / "input").write_bytes(data)
    (folder / "traceback.txt").write_text(sig + "\n\n" + "".join(traceback.format_exception(error)))


# -- replay (for coverage, or to look at a crash) ---------------------------------------------

def replay(name, paths, cov=None):
    if cov:
        cov.start()
    target = load(name)
    files = [f for p in map(Path, paths) for f in (sorted(p.iterdir()) if p.is_dir() else [p]) if f.is_file()]
    bad = 0
    for f in files:
        try:
            target.run(f.read_bytes())
        except target.allowed:
            pass
        except Exception:
            bad += 1
            if not cov:
                print("%s:" % f, file=sys.stderr)
                traceback.print_exc()
    if cov:
        cov.stop()
    return target, len(files), bad


def function_lines(path, names):
    """{name: (first line, last line)} of the named functions and methods."""
    tree, found = ast.parse(path.read_text()), {}
    for node in tree.body:
        members = node.body if isinstance(node, ast.ClassDef) else [node]
        for fn in members:
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = "%s.%s" % (node.name, fn.name) if isinstance(node, ast.ClassDef) else fn.name
                if qual in names:
                    found[qual] = (fn.lineno, fn.end_lineno)
    missing = set(names) - set(found)
    if missing:
        raise SystemExit("fuzz: %s has no %s" % (path, ", ".join(sorted(missing))))
    return found


def coverage_of(name, corpus):
    """Replay the corpus under coverage.py: lines and branches of the
    target's functions that the inputs reach."""
    import coverage
    cov = coverage.Coverage(branch=True, data_file=None)
    target, _n, _bad = replay(name, [corpus], cov)
    report = REPO / "build" / ("fuzz-coverage-%d.json" % os.getpid())
    report.parent.mkdir(exist_ok=True)
    files = [str(REPO / rel) for rel, _names in target.functions]
    cov.json_report(morfs=files, outfile=str(report))
    data = json.loads(report.read_text())["files"]
    report.unlink()
    lines = [0, 0]
    branches = [0, 0]
    for rel, names in target.functions:
        info = next(v for k, v in data.items() if str(REPO / rel).endswith(k) or k.endswith(rel))
        spans = function_lines(REPO / rel, names).values()

        def inside(n, spans=spans):
            return any(a <= n <= b for a, b in spans)
        run, missing = set(info["executed_lines"]), set(info["missing_lines"])
        lines[0] += len([n for n in run if inside(n)])
        lines[1] += len([n for n in run | missing if inside(n)])
        taken, not_taken = info.get("executed_branches", []), info.get("missing_branches", [])
        branches[0] += len([b for b in taken if inside(b[0])])
        branches[1] += len([b for b in taken + not_taken if inside(b[0])])
    return {"lines": lines, "branches": branches}


# -- the driver ------------------------------------------------------------------------------

def run_target(name, opts, work):
    import fuzz_targets
    target = fuzz_targets.TARGETS[name]()
    target.setup()
    folder = work / name
    corpus, crashes = folder / "corpus", folder / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    (crashes / "count").write_text("")
    for seed in target.seeds():
        (corpus / ("seed-" + hashlib.sha1(seed).hexdigest()[:16])).write_bytes(seed)
    args = ["-runs=%d" % opts.runs, "-seed=%d" % opts.seed, "-max_len=%d" % target.max_len,
            "-timeout=20", "-rss_limit_mb=2048", "-print_final_stats=1", "-reload=0"]
    if opts.seconds:
        args.append("-max_total_time=%d" % opts.seconds)
    words = target.dictionary()
    if words:
        (folder / "dict").write_text("".join("%s\n" % json.dumps(w) for w in words))
        args.append("-dict=%s" % (folder / "dict"))
    env = dict(os.environ, QWYNG_FUZZ_CRASHES=str(crashes))
    start = time.monotonic()
    done = subprocess.run([sys.executable, __file__, "--worker", name] + args + [str(corpus)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - start
    (folder / "libfuzzer.log").write_text(done.stderr[-200000:])
    inputs = next((int(line.split(":")[-1]) for line in done.stderr.splitlines()
                   if line.startswith("stat::number_of_executed_units")), 0)
    hits = [line for line in (crashes / "count").read_text().splitlines() if line]
    # libFuzzer stops on what the harness cannot catch: a timeout, memory, a signal
    fatal = done.returncode != 0
    result = {"target": name, "side": target.side, "inputs": inputs, "seconds": round(seconds, 1),
              "crash_inputs": len(hits), "crashes": sorted(set(hits)), "stopped_by_libfuzzer": fatal}
    if fatal:
        tail = [line for line in done.stderr.splitlines() if "ERROR" in line or "Error" in line or "ALARM" in line]
        result["libfuzzer"] = tail[:5] or done.stderr.splitlines()[-5:]
    if not opts.no_coverage:
        cov = subprocess.run([sys.executable, __file__, "--coverage", name, str(corpus)],
                             stdout=subprocess.PIPE, text=True, check=True)
        result["coverage"] = json.loads(cov.stdout)
    return result


def show(r):
    cov = r.get("coverage")
    figures = ("lines %d/%d, branches %d/%d" % (*cov["lines"], *cov["branches"])) if cov else ""
    print("%-14s %-5s %9d inputs %8.1f s %7.0f/s  crashes %d%s  %s" % (
        r["target"], r["side"], r["inputs"], r["seconds"], r["inputs"] / max(r["seconds"], 1e-9),
        len(r["crashes"]), " (libFuzzer stopped)" if r["stopped_by_libfuzzer"] else "", figures), flush=True)
    for sig in r["crashes"]:
        print("    crash: %s" % sig)
    for line in r.get("libfuzzer", []):
        print("    libFuzzer: %s" % line)


def main():
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], sys.argv[3:])
    if sys.argv[1:2] == ["--coverage"]:
        print(json.dumps(coverage_of(sys.argv[2], sys.argv[3])))
        return 0
    if sys.argv[1:2] == ["--replay"]:
        _t, n, bad = replay(sys.argv[2], sys.argv[3:])
        print("%d inputs, %d crashes" % (n, bad))
        return 1 if bad else 0
    import fuzz_targets
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100000, help="inputs per target (default 100000)")
    p.add_argument("--seconds", type=int, default=0, help="also stop each target after this long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--targets", default=",".join(fuzz_targets.TARGETS), help="comma-separated (default: all)")
    p.add_argument("--work", default=str(REPO / "build" / "fuzz"), help="corpora and crashes (default build/fuzz)")
    p.add_argument("--no-coverage", action="store_true", help="skip the coverage replay")
    p.add_argument("--json", help="write the results here too")
    opts = p.parse_args()
    names = opts.targets.split(",")
    unknown = set(names) - set(fuzz_targets.TARGETS)
    if unknown:
        p.error("unknown targets: %s (known: %s)" % (", ".join(sorted(unknown)), ", ".join(fuzz_targets.TARGETS)))
    results = []
    for name in names:
        results.append(run_target(name, opts, Path(opts.work)))
        show(results[-1])
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["crashes"] or r["stopped_by_libfuzzer"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
