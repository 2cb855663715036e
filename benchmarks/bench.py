"""fusedrnn against torch.nn: LSTM and GRU, inference and training, on every
device present (CPU always, CUDA when a GPU is visible).

    python -m benchmarks.bench              # --quick: a representative subset, minutes on 2 cores
    python -m benchmarks.bench --full       # every config (fastrnns, small batch, DeepBench)
    python -m benchmarks.bench --smoke      # CI: the smallest configs, short timing
    python -m benchmarks.bench --persistent # T=100, B 1..64, H 256..1024
    python -m benchmarks.bench --cudnn-persistent  # CUDA: float16 LSTM rows where cuDNN persists
    python -m benchmarks.bench --regularisers # layer_norm, zoneout, recurrent_dropout: their cost
    python -m benchmarks.bench --cells      # LSTMCell and GRUCell, one call per step
    python -m benchmarks.bench --packed     # PackedSequence input
    python -m benchmarks.bench --omp-passive  # the same with OMP_WAIT_POLICY=PASSIVE, labelled so
    python -m benchmarks.bench --as-avx2-cpu  # an AVX2 CPU: fusedrnn, ATen, oneDNN, MKL held to AVX2
    python -m benchmarks.bench --markdown   # after the run, write benchmarks/RESULTS.md
    python -m benchmarks.bench --plot-only --markdown  # no run: plots and RESULTS.md from the JSON

Each row: same weights (fusedrnn.from_torch), same inputs, same dtype and TF32
setting, input projection included in both. Before timing, a parity check
against a float64 oracle (benchmarks/cases.py, Note [parity tolerance]); a row
that fails it is marked failed and not timed. Timing: benchmarks/timing.py.
Measured in the environment the process was started in: nothing is set on
its behalf, and the runtime variables in force are recorded
(benchmarks/environment.py, Note [measured in the user's environment]).
Results: one dated JSON per device and a PNG beside it
(benchmarks/report.py, Note [result files]). Exit status 1 when any row
failed (parity or error). --regularisers and --cells run the rows of
benchmarks/regularisers.py and benchmarks/cells.py instead (CPU, float32;
with --smoke, short timing), written to regularisers-cpu-<set>-<date>.json and
cells-cpu-<set>-<date>.json, no plot.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python benchmarks/bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import environment  # noqa: E402 (imports no torch)

if __name__ == "__main__":
    environment.reexec_if_asked()  # before torch loads

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fusedrnn  # noqa: E402
from benchmarks import (cases, cells, configs, regularisers, report, results_md,  # noqa: E402
                        timing)

# (rounds, min_run_time in s per function per round) of each set and device.
# GPU rows are short and steady, and GPU time is scarce: shorter runs there.
TIMING = {("smoke", "cpu"): (2, 0.01), ("quick", "cpu"): (3, 0.1), ("full", "cpu"): (5, 0.5),
          ("persistent", "cpu"): (3, 0.1), ("packed", "cpu"): (3, 0.1),
          ("packed", "cuda"): (3, 0.05),
          ("smoke", "cuda"): (2, 0.01), ("quick", "cuda"): (3, 0.05), ("full", "cuda"): (3, 0.1),
          ("persistent", "cuda"): (3, 0.05), ("cudnn-persistent", "cuda"): (3, 0.05)}
# The pure-Python reference runs on the CPU only; in the full set it is skipped
# above this hidden size (minutes per row, and nothing the smaller rows do not show).
REFERENCE_MAX_H = {"smoke": None, "quick": None, "persistent": None, "cudnn-persistent": None,
                   "packed": None,
                   "full": 1024}
ERROR_TEXT_CHARS = 300


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("which configs (--smoke wins over --full, --full over "
                             "--cudnn-persistent, that over --persistent, --persistent over "
                             "--packed, --packed over --quick)")
    s.add_argument("--quick", action="store_true", help="representative subset (default)")
    s.add_argument("--full", action="store_true",
                   help="every config: fastrnns, small batch, DeepBench")
    s.add_argument("--persistent", action="store_true",
                   help="T=100, B in 1,8,16,64, H in 256,512,1024")
    s.add_argument("--cudnn-persistent", action="store_true",
                   help="CUDA only: where torch.nn.LSTM runs cuDNN's persistent kernel: T=100, "
                        "B in 8,16, H in 256,512,768,1024, float16, LSTM (defaults of --dtype "
                        "and --models for this set)")
    s.add_argument("--packed", action="store_true",
                   help="PackedSequence input, lengths from T/2 to T, unsorted: T=100, "
                        "B=16 H=256 and B=64 H=512")
    s.add_argument("--smoke", action="store_true",
                   help="smallest quick configs, very short timing (CI)")
    s.add_argument("--regularisers", action="store_true",
                   help="fusedrnn with layer_norm, zoneout, recurrent_dropout against the plain "
                        "layer and a Python loop (CPU, float32, T=100 B=16 H=256; with --smoke, "
                        "short timing)")
    s.add_argument("--cells", action="store_true",
                   help="fusedrnn.LSTMCell/GRUCell against torch.nn's, one call per step (CPU, "
                        "float32, B in 1,64, I=H in 256,1024; with --smoke, B=1 H=256, short "
                        "timing)")
    s.add_argument("--config", action="append", metavar="T,B,I,H",
                   help="run this config instead of the set's (repeatable)")
    w = p.add_argument_group("what to run")
    w.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="all: CPU, and CUDA when a GPU is visible (default)")
    w.add_argument("--dtype", help="comma list of " + ",".join(configs.PRECISIONS)
                   + " (tf32 = float32 with TF32 on; CUDA only). Default: CPU float32; "
                   "CUDA float32,tf32,bfloat16")
    w.add_argument("--models", help="comma list of LSTM, GRU (default: both; the "
                                     "cudnn-persistent set: LSTM)")
    w.add_argument("--modes", default="inference,training")
    w.add_argument("--no-reference", action="store_true",
                   help="do not time the pure-Python reference")
    w.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    w.add_argument("--rounds", type=int, help="interleaved timing rounds (set's default)")
    w.add_argument("--min-run-time", type=float,
                   help="seconds per function per round (set's default)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(environment.OMP_PASSIVE_FLAG, action="store_true",
                   help="run with OMP_WAIT_POLICY=PASSIVE (set before torch loads; results "
                        "labelled omp-passive). Default: the environment as it is")
    w.add_argument(environment.AVX2_CPU_FLAG, action="store_true",
                   help="an AVX2 CPU emulated: fusedrnn's AVX2 path against ATen, oneDNN "
                        "and MKL held to AVX2 (set before torch loads; results labelled so, "
                        "cpu-as-avx2-...). Note [an AVX2 CPU emulated] in environment.py"),
    o = p.add_argument_group("output")
    o.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    o.add_argument("--no-plot", action="store_true")
    o.add_argument("--plot-only", nargs="*", metavar="JSON",
                   help="run nothing: redraw the PNG of these results (default: the newest "
                        "of each kind under --out-dir); with --markdown, write RESULTS.md too")
    o.add_argument("--markdown", action="store_true",
                   help=f"write {results_md.DEFAULT_OUT.name} (long tables of the newest "
                        f"results under {report.RESULTS_DIR.parent.name}/"
                        f"{report.RESULTS_DIR.name}) after the run")
    args = p.parse_args(argv)
    args.command = report.shown_argv(sys.argv[1:] if argv is None else argv)  # as recorded
    args.set = "smoke" if args.smoke else "full" if args.full else \
        "cudnn-persistent" if args.cudnn_persistent else \
        "persistent" if args.persistent else "packed" if args.packed else "quick"
    if args.models is None:
        args.models = ",".join(configs.SET_MODELS.get(args.set, cases.MODELS))
    # The set's name goes into the results; --config runs are labelled 'custom'.
    args.label = "custom" if args.config and not args.smoke else args.set
    for name in ("models", "modes"):
        setattr(args, name, [v.strip() for v in getattr(args, name).split(",") if v.strip()])
    bad = [m for m in args.models if m not in cases.MODELS] + \
        [m for m in args.modes if m not in cases.MODES]
    if args.dtype:
        bad += [d for d in args.dtype.split(",") if d not in configs.PRECISIONS]
    if bad:
        p.error(f"unknown value(s): {', '.join(bad)}")
    return args


def devices(choice, set_name):
    have = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if set_name in configs.CUDA_ONLY_SETS:
        if choice == "cpu" or "cuda" not in have:
            raise SystemExit(f"--{set_name}: a CUDA set, and " + (
                "--device cpu was asked for" if choice == "cpu" else "no GPU is visible here"))
        return ["cuda"]
    if choice == "all":
        return have
    if choice not in have:
        raise SystemExit(f"--device {choice}: no such device visible here")
    return [choice]


def precisions(device, args, notes):
    names = args.dtype.split(",") if args.dtype else \
        configs.SET_PRECISIONS.get(args.set, {}).get(device, configs.DEFAULT_PRECISIONS[device])
    if device != "cuda" and any(n in configs.CUDA_ONLY_PRECISIONS for n in names):
        notes.append("tf32 asked for but skipped on the CPU (TF32 is a CUDA setting)")
        names = [n for n in names if n not in configs.CUDA_ONLY_PRECISIONS]
    return [configs.PRECISIONS[n] for n in names]


def _error_text(exc):
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:ERROR_TEXT_CHARS]


def run_row(case, mode, oracle, reference, rounds, min_run_time, threads):
    """Parity, then (when it holds) interleaved timing. Returns the row's fields."""
    row = {}
    par = case.parity(mode, oracle)
    row["parity"] = par
    if not par["passed"]:
        row["status"] = "parity-failed"
        return row
    fns = {"torch": case.step("torch", mode), "fused": case.step("fused", mode)}
    if reference is True:
        fns["reference"] = case.step("reference", mode)
    stats = timing.measure(fns, rounds, min_run_time, threads)
    t, f = stats["torch"]["median_ms"], stats["fused"]["median_ms"]
    row.update(status="ok", torch_ms=t, fused_ms=f, speedup=t / f,
               speedup_round_range=timing.ratio_range(stats["torch"], stats["fused"]))
    if "reference" in stats:
        r = stats["reference"]["median_ms"]
        row.update(reference_ms=r, fused_vs_reference=r / f)
    else:
        row.update(reference_ms=None, fused_vs_reference=None,
                   reference_note=None if reference is False else reference)
    row["timing"] = stats
    return row


def reference_plan(device, cfg, args):
    """True to time the reference; otherwise False (not applicable) or a note."""
    if args.no_reference:
        return "off"
    if device != "cpu" or "packed" in cfg.tags:  # the reference layer here is padded
        return False
    cap = REFERENCE_MAX_H[args.set]
    if cap is not None and cfg.H > cap:
        return f"skipped (H>{cap})"
    return True


def cudnn_algos(model, cfg, dtype, mode):
    """{pass: the cuDNN algorithm torch.nn's side runs} (configs.cudnn_algo),
    on the current GPU."""
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    gpu = (p.major, p.minor, p.multi_processor_count)
    passes = ("forward", "backward") if mode == "training" else ("forward",)
    return {k: configs.cudnn_algo(model, cfg, dtype, k == "forward", gpu) for k in passes}


def precision_rows(device, model, cfg, prec, args, oracles, timing_args):
    """Yields the rows (one per mode) of one model, config and precision, each
    run under that precision's TF32 setting. Errors are recorded in the row."""
    oracle_mode = "training" if "training" in args.modes else "inference"
    ref_plan = reference_plan(device, cfg, args)
    with cases.tf32_setting(device, prec.tf32):
        case, build_error = None, None
        try:
            case = cases.Case(model, cfg, prec, device, args.seed)
            if prec.dtype not in oracles:
                oracles[prec.dtype] = case.oracle(oracle_mode)
        except Exception as exc:  # noqa: BLE001 (recorded in the rows, the run goes on)
            build_error = exc
        for mode in args.modes:
            row = {"model": model, "config": cfg.as_dict(), "precision": prec.name,
                   "dtype": str(prec.dtype).replace("torch.", ""),
                   "tf32": prec.tf32 if device == "cuda" else None, "mode": mode}
            if device == "cuda":
                row["tf32_flags"] = environment.tf32_flags()  # as set for this row
                row["cudnn_algo"] = cudnn_algos(model, cfg, prec.dtype, mode)
            try:
                if build_error is not None:
                    raise build_error
                row.update(run_row(case, mode, oracles[prec.dtype], ref_plan, *timing_args))
            except Exception as exc:  # noqa: BLE001 (recorded in the row, the run goes on)
                row.update(status="error", error=_error_text(exc),
                           traceback=traceback.format_exc(limit=4))
            yield row


def run_device(device, args, cfgs):
    notes = []
    precs = precisions(device, args, notes)
    rounds, min_run_time = TIMING[args.set, device]
    rounds = args.rounds or rounds
    min_run_time = args.min_run_time or min_run_time
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = environment.record(device, threads)
    notes.append("measured in the environment the benchmark was started in: "
                 + environment.variables_text(env))
    if device == "cuda":
        notes.append("float32 rows run with TF32 off, tf32 rows are float32 with TF32 on, for "
                     "cuBLAS and cuDNN alike (torch.backends.cuda.matmul.allow_tf32 and "
                     "torch.backends.cudnn.allow_tf32); bfloat16 rows with TF32 off")
        notes.append("cudnn_algo (each row in the JSON): the cuDNN algorithm torch.nn runs "
                     "there, from torch's own rules (configs.cudnn_algo)")
    if not args.no_reference:
        cap = REFERENCE_MAX_H[args.set]
        notes.append("reference = fusedrnn.reference (plain torch ops, one Python step per time "
                     "step, input projection as one GEMM), timed on the CPU only"
                     + (f"; skipped for H > {cap} in this set" if cap else ""))
    started = time.time()
    # A CPU run on a forced path (FUSEDRNN_CPU_ISA) is kept apart: cpu-avx2-...
    tag = report.device_tag(device) + (environment.cpu_path_tag(env) if device == "cpu" else "")
    path = report.result_path(args.out_dir, tag, args.label, env["variant"], report.timestamp())
    doc = {
        "schema": report.SCHEMA_VERSION, "kind": "bench", "device": device, "set": args.label,
        "argv": args.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "complete": False,
        "env": env,
        "load_average_start": environment.load_average(),
        "timing": {
            "method": "after warm-up, one torch.utils.benchmark.Timer.blocked_autorange per "
                      "function per round; rounds interleaved, the order of the functions "
                      "reversed every round",
            "rounds": rounds, "min_run_time_s": min_run_time,
            "warmup_calls": timing.WARMUP_CALLS,
            "statistic": "median of per-call times over all blocks of all rounds",
            "speedup": "torch.nn median / fusedrnn median (same process)",
            "training": "forward + backward of (output * fixed random weights).sum(); grads of "
                        "x, h0, (c0) and all weights; grads set to None before each step",
            "inference": "torch.inference_mode(), modules in eval()",
        },
        "parity": {
            "oracle": "torch.nn in float64 with the same (rounded) weights and inputs",
            "metric": "per tensor max|y - y64| / max|y64|; outputs, h_n, c_n, and in training "
                      "the grads of x, h0, c0 and every weight",
            "rule": "err(fusedrnn) <= max(multiple * err(torch.nn), floor[precision])",
            "multiple": cases.PARITY_MULTIPLE, "floor": cases.PARITY_FLOOR,
        },
        "notes": notes,
        "rows": [],
    }
    if device == "cuda" and not fusedrnn.backends().get("cuda"):
        doc["error"] = "a GPU is visible but this fusedrnn build has no CUDA kernels"
        report.say(f"cuda: {doc['error']}")
        _finish(doc, path, started, args)
        return doc

    n_rows = len(cfgs) * len(args.models) * len(precs) * len(args.modes)
    timing_args = (rounds, min_run_time, threads)
    bar = tqdm(total=n_rows, desc=device, unit="row", file=sys.stderr, dynamic_ncols=True)
    for model in args.models:
        for cfg in cfgs:
            oracles = {}  # by storage dtype: float32 and tf32 rows share one
            for prec in precs:
                bar.set_postfix_str(f"{model} {cfg.name} {prec.name}")
                for row in precision_rows(device, model, cfg, prec, args, oracles, timing_args):
                    doc["rows"].append(row)
                    bar.update(1)
                    report.write_json(path, doc)  # partial results survive an interruption
                _free(device)
    bar.close()
    _finish(doc, path, started, args)
    return doc


def run_cpu_set(args, side):
    """A set with rows of its own, on the CPU in float32 (side: the module
    benchmarks/regularisers.py or benchmarks/cells.py): parity and interleaved
    timing per row, one dated JSON, the text table. Returns the exit status."""
    if args.device == "cuda" or (args.dtype and args.dtype != "float32"):
        raise SystemExit(f"--{side.KIND} runs on the CPU in float32 only")
    cfgs = [configs.parse_config(c) for c in args.config] if args.config \
        else side.SMOKE_CONFIGS if args.smoke else side.CONFIGS
    label = "smoke" if args.smoke else "custom" if args.config else "quick"
    rounds, min_run_time = TIMING["smoke" if args.smoke else "quick", "cpu"]
    rounds, min_run_time = args.rounds or rounds, args.min_run_time or min_run_time
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = environment.record("cpu", threads)
    started = time.time()
    path = report.result_path(args.out_dir, f"{side.KIND}-cpu", label, env["variant"],
                              report.timestamp())
    doc = {"schema": report.SCHEMA_VERSION, "kind": side.KIND, "device": "cpu",
           "set": label, "argv": args.command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "complete": False, "env": env, "load_average_start": environment.load_average(),
           "timing": {"method": "as the main set (timing.py): interleaved rounds, medians",
                      "rounds": rounds, "min_run_time_s": min_run_time, **side.TIMING_DOC},
           "parity": side.PARITY_DOC,
           "notes": ["measured in the environment the benchmark was started in: "
                     + environment.variables_text(env), side.NOTE],
           "rows": []}
    for spec in side.row_specs(args.models, cfgs, args.modes):
        try:
            row = side.run_row(**spec, seed=args.seed,
                               timing_args=(rounds, min_run_time, threads))
        except Exception as exc:  # noqa: BLE001 (recorded in the row)
            row = {**spec, "config": spec["config"].as_dict(), "status": "error",
                   "error": _error_text(exc), "traceback": traceback.format_exc(limit=4)}
        doc["rows"].append(row)
        report.write_json(path, doc)
        _free("cpu")
    doc.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               wall_s=round(time.time() - started, 1),
               load_average_end=environment.load_average())
    report.write_json(path, doc)
    report.say(f"cpu: results in {_rel(path)}")
    print(f"\n{report.title(doc)}; {side.SUMMARY}; {doc['wall_s']} s")
    for note in doc["notes"]:
        print(f"note: {note}")
    print(side.text_table(doc["rows"]))
    failed = [r for r in doc["rows"] if r["status"] != "ok"]
    if failed:
        print(f"{len(failed)} row(s) FAILED")
    if args.markdown:
        _write_markdown()
    return 1 if failed else 0


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _finish(doc, path, started, args):
    doc.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               wall_s=round(time.time() - started, 1),
               load_average_end=environment.load_average())
    report.write_json(path, doc)
    report.say(f"{doc['device']}: results in {_rel(path)}")
    if not args.no_plot and doc["rows"]:
        png = report.plot(doc, path.with_suffix(".png"))
        report.say(f"{doc['device']}: plot in {_rel(png)}")


def _rel(p):
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _redraw(args):
    """--plot-only: the PNG of each result (default: the newest of each kind
    under --out-dir), then, with --markdown, RESULTS.md from the same results."""
    paths = [Path(p) for p in args.plot_only] or report.newest_results(args.out_dir,
                                                                        kind="bench")
    if not paths:
        raise SystemExit(f"no dated results under {args.out_dir}")
    if not args.no_plot:
        for p in paths:
            png = report.plot(json.loads(p.read_text()), p.with_suffix(".png"))
            report.say(f"plot: {_rel(png)}")
    if args.markdown:
        _write_markdown([Path(p) for p in args.plot_only] or None)


def _write_markdown(paths=None):
    """RESULTS.md from paths, or from the newest result of each kind (GEMM
    micro-benchmark results included)."""
    out = results_md.write(paths)
    report.say(f"markdown: {_rel(out)}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    environment.check_asked(sys.argv[1:] if argv is None else argv)
    if args.plot_only is not None:
        _redraw(args)
        return 0
    if args.regularisers:
        return run_cpu_set(args, regularisers)
    if args.cells:
        return run_cpu_set(args, cells)
    cfgs = [configs.parse_config(c) for c in args.config] if args.label == "custom" \
        else configs.config_set(args.set)
    failed = 0
    for device in devices(args.device, args.set):
        doc = run_device(device, args, cfgs)
        print(f"\n{report.title(doc)}; speed-up = torch.nn / fusedrnn; {doc['wall_s']} s")
        for note in doc["notes"]:
            print(f"note: {note}")
        print(report.text_table(doc["rows"]))
        bad = [r for r in doc["rows"] if r["status"] != "ok"] + ([doc] if "error" in doc else [])
        if bad:
            print(f"{len(bad)} row(s) FAILED on {device}")
        failed += len(bad)
    if args.markdown:
        if not args.out_dir.resolve().is_relative_to(report.RESULTS_DIR):
            report.say(f"markdown: {_rel(args.out_dir)} is outside {_rel(report.RESULTS_DIR)}; "
                       "RESULTS.md holds the results under the latter only")
        _write_markdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
