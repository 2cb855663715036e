"""GEMM micro-benchmark: fusedrnn's own float32 CPU GEMM against oneDNN's
matmul and MKL's SGEMM on the products of an RNN layer, in GFLOP/s and as a
fraction of the machine's measured peak.

    python -m benchmarks.gemm              # --quick: the benchmark's quick set, LSTM and GRU
    python -m benchmarks.gemm --smoke      # seconds: one small config, short timing
    python -m benchmarks.gemm --omp-passive  # with OMP_WAIT_POLICY=PASSIVE, labelled so
    python -m benchmarks.gemm --isa avx2   # fusedrnn's AVX2 GEMM (on an AVX-512 CPU too)

Products, for a layer with G gates (LSTM 4, GRU 3) and config T, B, I, H
(M x K times K x N, float32, row-major):

    projection        x W_ih^T   [T*B, I]   x [I, G*H]    all steps at once
    recurrent         h W_hh^T   [B, H]     x [H, G*H]    one step, W_hh packed per call
    recurrent, packed h W_hh^T   [B, H]     x [H, G*H]    one step, W_hh packed beforehand
    input gradient    dG W_ih    [T*B, G*H] x [G*H, I]
    weight gradient   dG^T h     [G*H, T*B] x [T*B, H]

Who computes them: Note [the GEMMs compared]. Every product is checked
against float64 before it is timed; timing as in benchmarks/timing.py
(interleaved rounds, medians, one process). The oneDNN and MKL calls are
checked to run oneDNN and MKL (Note [backend check]). Results:
benchmarks/results/gemm-cpu-<set>-<date>.json (benchmarks/report.py, Note
[result files]), with the environment (benchmarks/environment.py).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/gemm.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import environment  # noqa: E402 (imports no torch)

if __name__ == "__main__":
    environment.reexec_if_asked()  # before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import torch  # noqa: E402

import fusedrnn  # noqa: E402,F401 (registers torch.ops.fusedrnn)
from benchmarks import cases, configs, report, timing  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3}
# (rounds, min_run_time in s per GEMM per round) of each set.
TIMING = {"smoke": (2, 0.01), "quick": (3, 0.1), "full": (3, 0.1), "custom": (3, 0.1)}
SMOKE_KEYS = [(100, 1, 256, 256)]
# Square sizes for the peak (Note [peak]): all three operands fit in L2 or L3.
PEAK_SIZES = {"smoke": (256,), "quick": (256, 384, 512), "full": (256, 384, 512),
              "custom": (256, 384, 512)}
# Config of the backend check: the run's first config with at least 2 steps
# and more than MM_ROWS rows (T*B), up to which fusedrnn hands the gradients'
# products to ATen's mm (Note [short products by ATen's mm] in
# csrc/x86/weight_grad.h): fewer would check a path the timed shapes do not take.
MM_ROWS = 128
LIBRARIES = ("fusedrnn", "oneDNN", "MKL")
# fusedrnn's own GEMM paths (FUSEDRNN_CPU_ISA; amx's float32 GEMM is avx512's);
# on the generic CPU path (no AVX-512 nor AVX2, or forced) fusedrnn::linear
# falls back to ATen's.
FUSEDRNN_GEMM_ISAS = ("avx512", "avx2")
FUSEDRNN_GEMM_PATHS = ("amx",) + FUSEDRNN_GEMM_ISAS

# Note [the GEMMs compared]
# fusedrnn: its own GEMM (csrc/x86/panel_gemm.h) for the CPU path in force
#   (AVX-512 by default where the CPU has it, AVX2 with --isa avx2 or on an
#   AVX2-only CPU), as the layer runs it: fusedrnn::linear (the input
#   projection) packs the weights into panels of 64 (AVX-512) or 16 (AVX2)
#   columns on every call; fusedrnn::linear_backward's input gradient likewise.
#   The per-step recurrent product has no op of its own: inside
#   fusedrnn::lstm_forward / gru_forward each tile of it goes through the gate
#   math while still in L1, with W_hh packed once per sequence. So it is
#   measured two ways: fusedrnn::linear on the step's shape (same micro-kernel
#   family, W_hh packed on every call: packing reads and writes all of W_hh,
#   at small B as much memory traffic as the product itself), and, as 'recurrent, packed', one step of the fused forward op
#   (time of T steps / T, so it includes the gate math and the barrier between
#   steps; GFLOP/s count the product only). The weight gradients are the
#   layers' own GEMM, fusedrnn::linear_backward's (packing included).
# oneDNN: torch.ops.mkldnn._linear_pointwise (oneDNN inner product, which
#   runs oneDNN's brgemm matmul kernels) with the weights as they are, or
#   reordered once by torch.ops.mkldnn._reorder_linear_weight ('packed');
#   the gradients through aten::mkldnn_linear_backward_input / _weights
#   (oneDNN's backward-data / backward-weights inner product), on oneDNN
#   tensors made beforehand. Any reorder of the result the op does is part of
#   the call.
# MKL: torch.mm on float32 CPU tensors (MKL SGEMM, transposes passed as flags),
#   'packed': torch.ops.mkl._mkl_linear on weights packed once by
#   torch.ops.mkl._mkl_reorder_linear_weight (SGEMM_PACK / SGEMM_COMPUTE).


@dataclass(frozen=True)
class Product:
    key: str
    label: str
    formula: str


PRODUCTS = [
    Product("projection", "projection", "x W_ih^T: [T*B, I] x [I, G*H]"),
    Product("recurrent", "recurrent", "h W_hh^T: [B, H] x [H, G*H], W_hh packed per call"),
    Product("recurrent_packed", "recurrent, packed",
            "h W_hh^T: [B, H] x [H, G*H], W_hh packed beforehand (fusedrnn: one fused step)"),
    Product("input_grad", "input gradient", "dG W_ih: [T*B, G*H] x [G*H, I]"),
    Product("weight_grad", "weight gradient", "dG^T h: [G*H, T*B] x [T*B, H]"),
]


def mnk(product, G, cfg):
    T, B, I, H = cfg.key
    return {"projection": (T * B, I, G * H), "recurrent": (B, H, G * H),
            "recurrent_packed": (B, H, G * H), "input_grad": (T * B, G * H, I),
            "weight_grad": (G * H, T * B, H)}[product]


class Operands:
    """The tensors of one model and config, float32, drawn from seed."""

    def __init__(self, model, cfg, seed):
        T, B, I, H = cfg.key
        self.model, self.cfg, self.G = model, cfg, GATES[model]
        gen = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return scale * torch.randn(*shape, generator=gen)

        GH = self.G * H
        self.x = rnd(T * B, I)
        self.hs = rnd(T * B, H, scale=0.5)  # h of every step (weight gradient)
        self.h = self.hs[:B].clone()
        self.w_ih = rnd(GH, I, scale=I ** -0.5)
        self.w_hh = rnd(GH, H, scale=H ** -0.5)
        self.b_hh = rnd(GH, scale=0.1)
        self.dg = rnd(T * B, GH)
        self.x_proj = rnd(T, B, GH, scale=0.5)
        self.c0 = rnd(B, H, scale=0.5)

    def lhs_rhs(self, product):
        """(a [M, K], b [K, N]) as plain tensors: for the float64 check."""
        return {"projection": (self.x, self.w_ih.t()), "recurrent": (self.h, self.w_hh.t()),
                "recurrent_packed": (self.h, self.w_hh.t()), "input_grad": (self.dg, self.w_ih),
                "weight_grad": (self.dg.t(), self.hs)}[product]


def calls(product, o):
    """{library: no-argument function returning the product} (Note [the GEMMs
    compared]). Packing, transposes and layout conversions that are not part
    of the call happen here, outside the timed functions."""
    ops, mkldnn, mkl = torch.ops.fusedrnn, torch.ops.mkldnn, torch.ops.mkl
    T, B, I, H = o.cfg.key
    if product in ("projection", "recurrent"):
        a, w = (o.x, o.w_ih) if product == "projection" else (o.h, o.w_hh)
        return {"fusedrnn": lambda: ops.linear(a, w, None),
                "oneDNN": lambda: mkldnn._linear_pointwise(a, w, None, "none", [], ""),
                "MKL": lambda: torch.mm(a, w.t())}
    if product == "recurrent_packed":
        w_dnnl = mkldnn._reorder_linear_weight(o.w_hh, B)
        w_mkl = mkl._mkl_reorder_linear_weight(o.w_hh, B)
        if o.model == "LSTM":
            def step():
                return ops.lstm_forward(o.x_proj, o.h, o.c0, o.w_hh, None, o.b_hh, None, False,
                                        False)[0]
        else:
            def step():
                return ops.gru_forward(o.x_proj, o.h, o.w_hh, o.b_hh, None, False, True,
                                       False)[0]
        return {"fusedrnn": step,
                "oneDNN": lambda: mkldnn._linear_pointwise(o.h, w_dnnl, None, "none", [], ""),
                "MKL": lambda: mkl._mkl_linear(o.h, w_mkl, o.w_hh, None, B)}
    if product == "input_grad":
        dg_dnnl, like_x = o.dg.to_mkldnn(), torch.empty(T * B, I)
        return {"fusedrnn": lambda: ops.linear_backward(o.dg, like_x, o.w_ih, True, False,
                                                        False)[0],
                "oneDNN": lambda: torch.ops.aten.mkldnn_linear_backward_input(
                    [T * B, I], dg_dnnl, o.w_ih),
                "MKL": lambda: torch.mm(o.dg, o.w_ih)}
    assert product == "weight_grad", product
    dg_dnnl, hs_dnnl, w_dnnl = o.dg.to_mkldnn(), o.hs.to_mkldnn(), o.w_hh.to_mkldnn()
    return {"fusedrnn": lambda: ops.linear_backward(o.dg, o.hs, o.w_hh, False, True, False)[1],
            "oneDNN": lambda: torch.ops.aten.mkldnn_linear_backward_weights(
                dg_dnnl, hs_dnnl, w_dnnl, False)[0],
            "MKL": lambda: torch.mm(o.dg.t(), o.hs)}


def _dense(t):
    return t.to_dense() if t.layout == torch._mkldnn else t


def check(product, o, fns):
    """Each library's product against float64 (the rule of Note [parity
    tolerance] in cases.py, with MKL as the baseline); the fused step is
    covered by the test suite and only its output's finiteness is checked
    here. Returns {library: {'passed', 'err', 'allowed'}}."""
    a, b = o.lhs_rhs(product)
    want = a.double() @ b.double()
    errs = {}
    for lib, fn in fns.items():
        got = _dense(fn())
        if product == "recurrent_packed" and lib == "fusedrnn":
            errs[lib] = None if bool(torch.isfinite(got).all()) else float("inf")
        else:
            errs[lib] = cases.rel_err(got.reshape(want.shape), want)
    allowed = max(cases.PARITY_MULTIPLE * (errs["MKL"] or 0.0), cases.PARITY_FLOOR["float32"])
    return {lib: {"passed": e is None or e <= allowed, "err": e, "allowed": allowed}
            for lib, e in errs.items()}


# Note [peak]
# The fraction of peak needs the machine's float32 FMA rate. We do not compile
# a register-only FMA loop at run time (the package never compiles on import,
# and a benchmark should not need a compiler); the peak is the best rate any
# of the three GEMMs reaches on square float32 products small enough to stay
# in cache (PEAK_SIZES), with the run's thread count, or on any RNN product if
# one is faster. That is a lower bound of the FMA peak: fractions are of what
# the best GEMM here achieves. Dividing it
# by threads and the clock /proc/cpuinfo reports gives flops per cycle per
# core, a hint at the FMA width (64: two 512-bit FMA pipes; 32: one, or two
# 256-bit), rough since the clock under load is not the reported one.
def measure_peak(sizes, rounds, min_run_time, threads, seed):
    gen = torch.Generator().manual_seed(seed)
    best, rates = None, []
    for n in sizes:
        a, w = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        fns = {"fusedrnn": lambda: torch.ops.fusedrnn.linear(a, w, None),
               "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], ""),
               "MKL": lambda: torch.mm(a, w.t())}
        with torch.inference_mode():
            stats = timing.measure(fns, rounds, min_run_time, threads)
        for lib, st in stats.items():
            gflops = 2 * n ** 3 / (st["median_ms"] * 1e-3) / 1e9
            rates.append({"n": n, "library": lib, "gflops": gflops, "median_ms": st["median_ms"]})
            if best is None or gflops > best["gflops"]:
                best = rates[-1]
    return best, rates


def run(args, cfgs, env):
    """(peak, rows): every product of every model and config, then the peak
    (Note [peak]) and each rate's fraction of it."""
    rounds, min_run_time = TIMING[args.label]
    rounds, min_run_time = args.rounds or rounds, args.min_run_time or min_run_time
    threads = env["torch_threads"]
    best, rates = measure_peak(PEAK_SIZES[args.label], rounds, min_run_time, threads, args.seed)
    report.say(f"square products: {best['gflops']:.1f} GFLOP/s ({best['library']}, "
               f"n={best['n']})")
    rows = []
    for model in args.models:
        for cfg in cfgs:
            o = Operands(model, cfg, args.seed)
            for prod in PRODUCTS:
                rows.append(run_product(prod, o, rounds, min_run_time, threads))
                report.say(f"{model} {cfg.name} {prod.label}: " + ", ".join(
                    f"{lib} {r['gflops']:.1f}" if r["status"] == "ok" else f"{lib} {r['status']}"
                    for lib, r in rows[-1]["results"].items()))
    # A product faster than the square ones raises the bound (a noisy moment
    # during the square products must not give fractions above 1).
    for row in rows:
        for lib, r in row["results"].items():
            if r["status"] == "ok" and r["gflops"] > best["gflops"]:
                best = {"n": None, "library": lib, "gflops": r["gflops"],
                        "product": f"{row['model']} {row['label']} {row['M']}x{row['K']}x"
                                   f"{row['N']}"}
    for row in rows:
        for r in row["results"].values():
            if r["status"] == "ok":
                r["fraction_of_peak"] = r["gflops"] / best["gflops"]
    mhz = env.get("cpu_mhz_reported")
    peak = {"gflops": best["gflops"], "library": best["library"], "n": best["n"],
            "product": best.get("product"), "threads": threads, "square_products": rates,
            "flops_per_cycle_per_thread_at_reported_clock":
                best["gflops"] * 1e3 / (threads * mhz) if mhz else None,
            "method": "best rate of fusedrnn, oneDNN and MKL on square float32 products "
                      f"n in {list(PEAK_SIZES[args.label])} (cache-resident) or on any product "
                      "measured, same thread count; a lower bound of the FMA peak "
                      "(Note [peak] in benchmarks/gemm.py)"}
    return peak, rows


def run_product(prod, o, rounds, min_run_time, threads):
    M, K, N = mnk(prod.key, o.G, o.cfg)
    flops = 2 * M * K * N
    fns = calls(prod.key, o)
    with torch.inference_mode():
        parity = check(prod.key, o, fns)
        ok = {lib: fn for lib, fn in fns.items() if parity[lib]["passed"]}
        stats = timing.measure(ok, rounds, min_run_time, threads) if ok else {}
    # The fused step runs T steps per call.
    per_call = {lib: o.cfg.T if prod.key == "recurrent_packed" and lib == "fusedrnn" else 1
                for lib in fns}
    results = {}
    for lib in fns:
        if lib not in stats:
            results[lib] = {"status": "parity-failed", "parity": parity[lib]}
            continue
        ms = stats[lib]["median_ms"] / per_call[lib]
        results[lib] = {"status": "ok", "median_ms": ms, "gflops": flops / (ms * 1e-3) / 1e9,
                        "products_per_call": per_call[lib], "parity": parity[lib],
                        "timing": stats[lib]}
    return {"model": o.model, "config": o.cfg.as_dict(), "product": prod.key,
            "label": prod.label, "formula": prod.formula, "M": M, "K": K, "N": N,
            "flops": flops, "results": results}


# Note [backend check]
# A call named oneDNN must run a oneDNN primitive and one named MKL an MKL
# GEMM, and fusedrnn's neither. A child process runs each call once on small
# operands with ONEDNN_VERBOSE=1 and MKL_VERBOSE=1 (both print each primitive
# or BLAS call they run) and the lines between markers are attributed to the
# call; the libraries' C stdio is flushed after each call so the order holds.
def probe(spec_json):
    """In the child: run every call once between markers."""
    import ctypes

    spec = json.loads(spec_json)
    libc = ctypes.CDLL(None)
    o = Operands(spec["model"], configs.Config(*spec["config"]), 0)
    with torch.inference_mode():
        for prod in PRODUCTS:
            for lib, fn in calls(prod.key, o).items():
                libc.fflush(None)
                print(f"@@begin {prod.key} {lib}", flush=True)
                fn()
                libc.fflush(None)
                print("@@end", flush=True)
    return 0


def _verbose_lines(text):
    """{(product, library): {'onednn': [kind:impl:prop], 'mkl': [function]}}."""
    seen, cur = {}, None
    for line in text.splitlines():
        if line.startswith("@@begin "):
            cur = tuple(line.split()[1:3])
            seen[cur] = {"onednn": [], "mkl": []}
        elif line.startswith("@@end"):
            cur = None
        elif cur and line.startswith(("onednn_verbose", "dnnl_verbose")):
            f = line.split(",")
            if len(f) > 7 and f[2] == "primitive" and f[3] == "exec" and f[5] != "reorder":
                seen[cur]["onednn"].append(":".join(f[5:8]))
        elif cur and line.startswith("MKL_VERBOSE ") and "(" in line:
            name = line.split()[1].split("(")[0]
            if name.startswith(("SGEMM", "sgemm", "GEMM")):
                seen[cur]["mkl"].append(name)
    return seen


def backend_check(model, cfg):
    steps = max(2, MM_ROWS // cfg.B + 1)
    spec = json.dumps({"model": model, "config": [steps, cfg.B, cfg.I, cfg.H]})
    env = dict(os.environ, ONEDNN_VERBOSE="1", DNNL_VERBOSE="1", MKL_VERBOSE="1",
               PYTHONUNBUFFERED="1")
    code = f"import sys; from benchmarks import gemm; sys.exit(gemm.probe({spec!r}))"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=environment.REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    seen = _verbose_lines(proc.stdout)
    out = {"config": {"T": steps, "B": cfg.B, "I": cfg.I, "H": cfg.H}, "model": model,
           "calls": {}}
    for (prod, lib), s in seen.items():
        want = {"oneDNN": bool(s["onednn"]) and not s["mkl"],
                "MKL": bool(s["mkl"]) and not s["onednn"],
                "fusedrnn": not s["onednn"] and not s["mkl"]}[lib]
        out["calls"][f"{prod} {lib}"] = {"ok": want, "onednn": sorted(set(s["onednn"])),
                                         "mkl": sorted(set(s["mkl"]))}
    out["ok"] = bool(out["calls"]) and all(c["ok"] for c in out["calls"].values())
    return out


# -- table --------------------------------------------------------------------------
COLUMNS = ["model", "T,B,I,H", "product", "M x K x N", *LIBRARIES,
           "fusedrnn/oneDNN", "fusedrnn/MKL"]


def _cell(r):
    if r["status"] != "ok":
        return r["status"].upper()
    return f"{r['gflops']:.1f} ({100 * r['fraction_of_peak']:.0f}%)"


def row_cells(row):
    c, res = row["config"], row["results"]
    ratio = [f"{res['fusedrnn']['gflops'] / res[lib]['gflops']:.2f}x"
             if res["fusedrnn"]["status"] == "ok" and res[lib]["status"] == "ok" else "-"
             for lib in ("oneDNN", "MKL")]
    return [row["model"], f"{c['T']},{c['B']},{c['I']},{c['H']}", row["label"],
            f"{row['M']} x {row['K']} x {row['N']}", *(_cell(res[lib]) for lib in LIBRARIES),
            *ratio]


def text_table(rows):
    body = [row_cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *body)]
    fmt = [str.ljust] * 4 + [str.rjust] * (len(COLUMNS) - 4)
    lines = ["  ".join(f(v, w) for f, v, w in zip(fmt, COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(f(v, w) for f, v, w in zip(fmt, r, widths))
                              for r in body])


def peak_text(doc):
    p = doc["peak"]
    fpc = p.get("flops_per_cycle_per_thread_at_reported_clock")
    where = f"square n={p['n']}" if p.get("n") else p.get("product")
    return (f"Peak {p['gflops']:.1f} GFLOP/s with {p['threads']} threads: the best rate of the "
            f"three GEMMs on cache-resident square float32 products or any product here "
            f"({p['library']}, {where}), a lower bound of the FMA peak"
            + (f"; {fpc:.1f} flops per cycle per thread at the clock /proc/cpuinfo reports"
               if fpc else "") + ".")


def notes(doc):
    out = ["GFLOP/s (fraction of the peak); fusedrnn/X = fusedrnn GFLOP/s / X GFLOP/s, "
           "same process, interleaved; medians"]
    out += [f"{p.label}: {p.formula}" for p in PRODUCTS]
    out.append("recurrent, packed: the fusedrnn column is one step of the fused forward op "
               "(GEMM and gate math; time of T steps / T); the per-step product has no op of "
               "its own (Note [the GEMMs compared] in benchmarks/gemm.py)")
    out.append("weight gradient: the fusedrnn column is the layers' own, "
               "fusedrnn::linear_backward's (Note [weight-gradient GEMM])")
    path = doc["env"].get("fusedrnn_cpu_path")
    if not doc.get("fusedrnn_gemm", True):
        out.append("the generic CPU path is in force (no AVX-512 or AVX2, or forced): the "
                   "fusedrnn column is ATen's fallback, not fusedrnn's GEMM")
    elif path:
        isa = "avx512" if path["isa"] == "amx" else path["isa"]  # float32 on the amx path
        out.append(f"fusedrnn: its {isa} GEMM and gate kernels"
                   + (" (forced by FUSEDRNN_CPU_ISA)" if path.get("forced") else ""))
    chk = doc.get("backend_check") or {}
    if "error" in chk:
        out.append(f"backend check failed to run: {chk['error']}")
    elif chk:
        bad = [k for k, c in chk["calls"].items() if not c["ok"]]
        impls = sorted({i for k, c in chk["calls"].items() if k.endswith("oneDNN")
                        for i in c["onednn"]})
        out.append("backend check (ONEDNN_VERBOSE/MKL_VERBOSE): " + (
            "every call runs the library it is named for" if not bad else
            "NOT as named: " + ", ".join(bad)) + (f"; oneDNN ran {', '.join(impls)}"
                                                   if impls else ""))
    return out


def markdown(doc):
    lines = [report.title(doc, markdown=True) + ".", "", peak_text(doc), "",
             *report.environment_lines(doc), "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * (len(COLUMNS) - 4)) + "|"]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in doc["rows"]]
    lines += [""] + [f"- {n}" for n in notes(doc)]
    return "\n".join(lines)


# -- command line -------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gemm",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("which configs (--smoke wins over --full, --full over --quick)")
    s.add_argument("--quick", action="store_true", help="the benchmark's quick set (default)")
    s.add_argument("--full", action="store_true", help="the benchmark's full set")
    s.add_argument("--smoke", action="store_true", help="one small config, very short timing")
    s.add_argument("--config", action="append", metavar="T,B,I,H",
                   help="run this config instead of the set's (repeatable)")
    w = p.add_argument_group("what to run")
    w.add_argument("--models", default="LSTM,GRU")
    w.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    w.add_argument("--rounds", type=int, help="interleaved timing rounds (set's default)")
    w.add_argument("--min-run-time", type=float,
                   help="seconds per GEMM per round (set's default)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(environment.OMP_PASSIVE_FLAG, action="store_true",
                   help="run with OMP_WAIT_POLICY=PASSIVE (set before torch loads; results "
                        "labelled omp-passive). Default: the environment as it is")
    w.add_argument("--isa", choices=FUSEDRNN_GEMM_ISAS,
                   help="fusedrnn's CPU path (sets FUSEDRNN_CPU_ISA for the run; default: as "
                        "the environment says, else the widest the CPU has)")
    w.add_argument("--no-backend-check", action="store_true",
                   help="skip the check that each call runs the library it is named for")
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    args = p.parse_args(argv)
    args.set = "smoke" if args.smoke else "full" if args.full else "quick"
    args.label = "custom" if args.config and not args.smoke else args.set
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in GATES]
    if bad:
        p.error(f"unknown model(s): {', '.join(bad)}")
    return args


def config_list(args):
    if args.label == "custom":
        return [configs.parse_config(c) for c in args.config]
    if args.set == "smoke":
        return [configs.Config(*k, ("smoke",)) for k in SMOKE_KEYS]
    return configs.config_set(args.set)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.omp_passive and environment.variant(environment.runtime_variables()) is None:
        raise SystemExit(f"{environment.OMP_PASSIVE_FLAG}: OMP_WAIT_POLICY=PASSIVE must be set "
                         "before torch loads; give the option on the command line")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        os.environ["FUSEDRNN_CPU_ISA"] = args.isa  # read by every op call
    cfgs = config_list(args)
    try:
        env = environment.record("cpu", torch.get_num_threads())
    except RuntimeError as exc:  # a path this CPU lacks, or a bad knob
        raise SystemExit(f"fusedrnn's CPU path: {str(exc).splitlines()[0]}") from exc
    started = time.time()
    doc = {"schema": report.SCHEMA_VERSION, "kind": "gemm", "device": "cpu", "set": args.label,
           "argv": report.shown_argv(sys.argv[1:] if argv is None else argv),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False, "env": env,
           "load_average_start": environment.load_average(),
           "fusedrnn_gemm": env["fusedrnn_cpu_path"]["isa"] in FUSEDRNN_GEMM_PATHS,
           "timing": {"method": "after warm-up, one torch.utils.benchmark.Timer.blocked_autorange"
                                " per GEMM per round; rounds interleaved, order reversed every "
                                "round; under torch.inference_mode()",
                      "statistic": "median of per-call times over all blocks of all rounds",
                      "rounds": args.rounds or TIMING[args.label][0],
                      "min_run_time_s": args.min_run_time or TIMING[args.label][1]},
           "flops": "2 M K N per product", "rows": []}
    path = report.result_path(args.out_dir,
                              "gemm-" + report.device_tag("cpu") + environment.cpu_path_tag(env),
                              args.label, env["variant"], report.timestamp())
    if not args.no_backend_check:
        doc["backend_check"] = backend_check(args.models[0], cfgs[0])
    doc["peak"], doc["rows"] = run(args, cfgs, env)
    doc.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               wall_s=round(time.time() - started, 1),
               load_average_end=environment.load_average())
    report.write_json(path, doc)
    print(f"\n{report.title(doc)}; {doc['wall_s']} s\n{peak_text(doc)}")
    print(text_table(doc["rows"]))
    for n in notes(doc):
        print(f"note: {n}")
    report.say(f"gemm: results in {path}")
    failed = [r for r in doc["rows"] for x in r["results"].values() if x["status"] != "ok"]
    chk = doc.get("backend_check")
    return 1 if failed or (chk is not None and not chk.get("ok")) else 0


if __name__ == "__main__":
    sys.exit(main())
