"""benchmarks/RESULTS.md: the long result tables, generated from the JSON
results (never edited by hand), each with the environment it was measured in.

    python -m benchmarks.results_md              # the newest result of each kind
    python -m benchmarks.results_md A.json B.json  # these results
    python -m benchmarks.bench --markdown        # after a benchmark run
"""
import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import environment, report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS.md"
SET_ORDER = {"quick": 0, "packed": 1, "persistent": 2, "cudnn-persistent": 3, "full": 4,
             "custom": 5}
KIND_ORDER = {"bench": 0, "cells": 1, "regularisers": 2, "gemm": 3}
HEADER = """# Benchmark results

Generated from the JSON results under `benchmarks/results/` by
`python -m benchmarks.results_md` (or `python -m benchmarks.bench --markdown`);
regenerate it rather than editing it. Each section is the newest result of
its kind and names the environment it was measured in: the benchmarks set no
OpenMP variable themselves, so a section measured with `OMP_WAIT_POLICY=PASSIVE`
(`--omp-passive`) says so in its title.
"""


def _sort_key(item):
    path, doc = item
    return (KIND_ORDER.get(doc.get("kind", "bench"), 9), doc.get("device", ""),
            SET_ORDER.get(doc.get("set"), 9), environment.recorded_variant(doc["env"]) or "",
            str(path.parent), path.name)


def _link(target, out):
    """target relative to out's folder; only the file name when it lies
    outside the repository (no machine paths in the document)."""
    rel = os.path.relpath(Path(target).resolve(), Path(out).resolve().parent)
    inside = Path(target).resolve().is_relative_to(environment.REPO_ROOT)
    return rel if inside else Path(target).name


def section(path, doc, out):
    kind = doc.get("kind", "bench")
    env = doc["env"]
    what = {"gemm": "GEMM micro-benchmark", "regularisers": "fusedrnn's regularisers",
            "cells": "fusedrnn's cells and one-step layers against torch.nn's"}.get(
                kind, "fusedrnn against torch.nn")
    head = (f"## {what}: {doc['device'].upper()}, `{doc['set']}` set"
            + environment.variant_title(env))
    if kind == "gemm":
        from benchmarks import gemm  # torch and fusedrnn: only when there is a GEMM result
        body = gemm.markdown(doc)
    elif kind in ("regularisers", "cells"):
        from benchmarks import cells, regularisers  # torch and fusedrnn, as for gemm
        body = {"regularisers": regularisers, "cells": cells}[kind].markdown(doc)
    else:
        body = report.markdown_table(doc)
    lines = [head, "", f"From `{_link(path, out)}`.", "", body]
    png = path.with_suffix(".png")
    if png.exists():
        lines += ["", f"![{what}, {doc['set']} set]({_link(png, out)})"]
    return "\n".join(lines)


def render(paths, out=DEFAULT_OUT):
    items = sorted(((Path(p), json.loads(Path(p).read_text())) for p in paths), key=_sort_key)
    return HEADER + "".join("\n" + section(p, d, out) + "\n" for p, d in items)


def write(paths=None, out=DEFAULT_OUT, root=report.RESULTS_DIR):
    """Writes out from paths (default: the newest result of each kind under
    root); returns out."""
    paths = list(paths) if paths else report.newest_results(root)
    if not paths:
        raise SystemExit(f"no dated results under {root}")
    out = Path(out)
    out.write_text(render(paths, out))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.results_md",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="*", type=Path,
                   help="results to include (default: the newest of each kind)")
    p.add_argument("--root", type=Path, default=report.RESULTS_DIR,
                   help="where to look for the newest results")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    out = write(args.json, args.out, args.root)
    report.say(f"markdown: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
