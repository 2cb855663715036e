"""Result files, the table (terminal and markdown) and
the speed-up plot."""
import datetime
import json
import re
import sys
from pathlib import Path

import torch

from benchmarks import environment

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# 2: the environment records every runtime variable in force (runtime_variables),
# the CPU's ISA flags and cores, and the variant (None or 'omp-passive').
SCHEMA_VERSION = 2


# -- files -------------------------------------------------------------------------
# Note [result files]
# Each run writes one dated JSON (and its PNG) and nothing else; "the latest
# result" is the newest dated file of its kind, found by newest_results(), for
# each model and precision it measured, so no result is ever stored twice. File names:
#     <device>-<set>[-omp-passive]-<YYYYmmdd-HHMMSS>.json     bench.py
#     gemm-<device>-<set>[-omp-passive]-<YYYYmmdd-HHMMSS>.json gemm.py
# where a CPU run on a path forced by FUSEDRNN_CPU_ISA has the device cpu-<path>
# (cpu-avx2), and one of an emulated AVX2 CPU (--as-avx2-cpu) cpu-as-avx2; each
# is the newest of its own kind, apart from the default path's.
# (results written before the set was part of the name: <device>-<stamp>.json).
# Smoke runs (CI) write smoke-<...>.json, overwritten each time and ignored by
# git and by newest_results().
STAMP_FORMAT = "%Y%m%d-%H%M%S"
_DATED = re.compile(r"^(?!smoke-)(?P<group>.+)-(?P<stamp>\d{8}-\d{6})\.json$")


def device_tag(device):
    """'cpu', or 'cuda-<gpu>' (e.g. cuda-h100-80gb-hbm3)."""
    if device != "cuda":
        return device
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def result_path(out_dir, prefix, set_name, variant, stamp):
    """Where one run's JSON goes (Note [result files]); prefix: device tag,
    or 'gemm-<device tag>'."""
    parts = [prefix, set_name] + ([variant] if variant else [])
    if set_name == "smoke":
        return Path(out_dir) / ("smoke-" + "-".join(parts[:1] + parts[2:]) + ".json")
    return Path(out_dir) / ("-".join(parts + [stamp]) + ".json")


def timestamp():
    return datetime.datetime.now().strftime(STAMP_FORMAT)


def write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def newest_results(root, kind=None, recursive=True):
    """The newest complete dated results of each kind under root (and its
    subfolders when recursive): per folder, kind ('bench' or 'gemm'), device,
    set, environment variant and forced CPU path, the newest file for each
    model and precision it measured, so a run of one model does not hide the
    other model's rows of an older run (Note [result files]). Sorted by
    folder, then file name."""
    best = {}
    for path in sorted(Path(root).rglob("*.json") if recursive else Path(root).glob("*.json")):
        m = _DATED.match(path.name)
        if not m:
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "rows" not in doc or not doc.get("complete", True):
            continue
        doc_kind = doc.get("kind", "bench")
        if kind is not None and doc_kind != kind:
            continue
        env = doc.get("env", {})
        key = (path.parent, doc_kind, doc.get("device"), env.get("gpu"), doc.get("set"),
               environment.recorded_variant(env), environment.forced_cpu_path(env),
               environment.emulated_avx2_cpu(env))
        measured = {(r.get("model", ""), r.get("precision", "")) for r in doc["rows"]}
        for pair in measured or {("", "")}:
            if key + pair not in best or m["stamp"] > best[key + pair][0]:
                best[key + pair] = (m["stamp"], path)
    return sorted({p for _, p in best.values()}, key=lambda p: (str(p.parent), p.name))


# -- table -------------------------------------------------------------------------
COLUMNS = ["model", "config", "dtype", "mode", "torch ms", "fusedrnn ms", "speed-up",
           "reference ms", "fused vs ref"]


def _fmt_ms(v):
    return "-" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.1f}")


def _fmt_x(v):
    return "-" if v is None else f"{v:.2f}x"


def row_cells(row):
    cfg = row["config"]
    name = f"T={cfg['T']} B={cfg['B']} I={cfg['I']} H={cfg['H']}"
    if cfg["tags"] and cfg["tags"][0] in ("fastrnns", "packed"):
        name += f" ({cfg['tags'][0]})"
    head = [row["model"], name, row["precision"], row["mode"]]
    if row["status"] != "ok":
        why = row.get("error") or _parity_text(row.get("parity"))
        return head + [f"{row['status'].upper()}: {why}", "", "", "", ""]
    ref = row.get("reference_ms")
    return head + [_fmt_ms(row["torch_ms"]), _fmt_ms(row["fused_ms"]), _fmt_x(row["speedup"]),
                   _fmt_ms(ref) if ref is not None else (row.get("reference_note") or "-"),
                   _fmt_x(row.get("fused_vs_reference"))]


def _parity_text(p):
    if not p:
        return ""
    return (f"{p['tensor']} err {p['fused_err']:.2e} > allowed {p['allowed']:.2e} "
            f"(torch.nn err {p['torch_err']:.2e})")


def text_table(rows):
    """Aligned table; a failed row's message spans the timing columns."""
    body = [(row_cells(r), r["status"] == "ok") for r in rows]
    widths = [len(h) for h in COLUMNS]
    for cells, ok in body:
        for i, v in enumerate(cells):
            if ok or i < 4:
                widths[i] = max(widths[i], len(v))

    def fmt(cells, ok):
        left = "  ".join(v.ljust(w) for v, w in zip(cells[:4], widths))
        right = cells[4] if not ok else "  ".join(v.rjust(w) for v, w in zip(cells[4:], widths[4:]))
        return (left + "  " + right).rstrip()

    lines = [fmt(COLUMNS, True), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt(c, ok) for c, ok in body])


def plain_table(columns, rows):
    """columns and rows (lists of strings) left-aligned, two spaces apart: the
    table of a set with rows of its own (regularisers.py, cells.py)."""
    body = [columns] + rows
    widths = [max(len(c[i]) for c in body) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in body)


def set_markdown(doc, caption, columns, rows, left):
    """RESULTS.md's section of a set with rows of its own: title and caption,
    the environment, the table (its first `left` columns text, the others
    numbers), the notes."""
    lines = [title(doc, markdown=True) + ". " + caption, "", *environment_lines(doc), "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * left + ["---:"] * (len(columns) - left)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [""] + [f"- {n}" for n in doc.get("notes", [])]).rstrip()


def title(doc, markdown=False):
    """One line naming where and how a result was measured; results measured
    with OMP_WAIT_POLICY=PASSIVE say so (Note [measured in the user's environment])."""
    env = doc["env"]
    where = env.get("gpu") or f"{env['cpu_model']}, {env['torch_threads']} threads"
    set_name = f"`{doc['set']}`" if markdown else doc["set"]
    return (f"{doc['device'].upper()} ({where}); torch {env['torch']}"
            + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if doc["device"] == "cuda" else "")
            + f"; {set_name} set, {doc['started'][:10]}" + environment.variant_title(env))


def shown_argv(argv):
    """argv without --out-dir, as the results record and show it: where they
    went changes nothing measured, and it names a directory of the machine
    that ran it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out-dir":
            skip = True
        elif not a.startswith("--out-dir="):
            out.append(a)
    return out


def environment_lines(doc):
    """Markdown bullets: the CPU, the runtime variables in force, the command."""
    env = doc["env"]
    lines = [f"- CPU: {env.get('cpu_model')}; {environment.isa_text(env)}",
             f"- environment: {environment.variables_text(env)}"]
    if doc.get("argv") is not None:
        lines.append("- command: `python -m benchmarks."
                     + ("gemm" if doc.get("kind") == "gemm" else "bench")
                     + "".join(" " + a for a in shown_argv(doc["argv"])) + "`")
    load = doc.get("load_average_start")
    lines.append(f"- fusedrnn commit {env.get('fusedrnn_commit')}"
                 + (f"; load average at start {load[0]:.2f}" if load else ""))
    return lines


def markdown_table(doc):
    lines = [title(doc, markdown=True) + ". Speed-up = torch.nn time / fusedrnn time "
             "(median, same process).", "", *environment_lines(doc), "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join(["---"] * 4 + ["---:"] * 5) + "|"]
    for r in doc["rows"]:
        c = row_cells(r)
        if r["status"] != "ok":
            c = c[:4] + [c[4], "", "", "", ""]
        lines.append("| " + " | ".join(v.replace("|", "/") for v in c) + " |")
    lines += [""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(lines).rstrip()


# -- plot --------------------------------------------------------------------------
PLOT_INCH_PER_BAR = 0.22
PLOT_WIDTH_INCHES = (7.0, 40.0)
PLOT_PANEL_HEIGHT_INCHES = 2.8
PLOT_MAX_LABELLED_BARS = 40  # value labels on the bars up to this many per panel


def plot(doc, png_path):
    """Speed-up (torch.nn / fusedrnn) per config: one panel per model and mode,
    one bar per precision, a dashed line at 1x, failed rows marked 'fail'."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    panels = [(m, mode) for m in ("LSTM", "GRU") for mode in ("inference", "training")
              if any(r["model"] == m and r["mode"] == mode for r in rows)]
    if not panels:
        return None
    precs = list(dict.fromkeys(r["precision"] for r in rows))
    cfgs = list(dict.fromkeys(_short(r["config"]) for r in rows))
    n_bars = len(cfgs) * len(precs)
    lo, hi = PLOT_WIDTH_INCHES
    width = min(hi, max(lo, PLOT_INCH_PER_BAR * n_bars + 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, PLOT_PANEL_HEIGHT_INCHES * len(panels)
                                                       + 1.2), squeeze=False)
    bar = 0.8 / len(precs)
    for ax, (model, mode) in zip(axes[:, 0], panels):
        for k, prec in enumerate(precs):
            xs, ys, fails = [], [], []
            for n, cfg in enumerate(cfgs):
                hit = [r for r in rows if r["model"] == model and r["mode"] == mode
                       and r["precision"] == prec and _short(r["config"]) == cfg]
                if not hit:
                    continue
                x = n - 0.4 + bar * (k + 0.5)
                if hit[0]["status"] == "ok":
                    xs.append(x)
                    ys.append(hit[0]["speedup"])
                else:
                    fails.append(x)
            bars = ax.bar(xs, ys, bar, label=prec)
            if n_bars <= PLOT_MAX_LABELLED_BARS:
                ax.bar_label(bars, fmt="%.2f", fontsize=6)
            for x in fails:
                ax.text(x, 0.02, "fail", rotation=90, ha="center", va="bottom", color="red",
                        fontsize=7, transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks(range(len(cfgs)))
        ax.set_xticklabels(cfgs, rotation=60, ha="right", fontsize=7)
        ax.set_xlim(-0.6, len(cfgs) - 0.4)
        ax.set_title(f"{model} {mode}", fontsize=9)
        ax.set_ylabel("speed-up (x)", fontsize=8)
        ax.margins(y=0.15)
        if len(precs) > 1:
            ax.legend(fontsize=7, ncols=len(precs))
    fig.suptitle("fusedrnn speed-up over torch.nn (torch.nn time / fusedrnn time)\n"
                 + title(doc), fontsize=9)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _short(cfg):
    s = f"T{cfg['T']} B{cfg['B']} H{cfg['H']}"
    return s if cfg["I"] == cfg["H"] else s + f" I{cfg['I']}"


def say(*args):
    print(*args, file=sys.stderr, flush=True)
