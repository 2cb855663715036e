"""Environment record, result files, the table (terminal and markdown) and
the speed-up plot."""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1


# -- environment ------------------------------------------------------------------
def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def tf32_flags():
    """TF32 state at start-up: legacy flags and torch's fp32_precision settings."""
    flags = {}
    for name, get in [
        ("cuda.matmul.allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
        ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
        ("cuda.matmul.fp32_precision", lambda: torch.backends.cuda.matmul.fp32_precision),
        ("cudnn.rnn.fp32_precision", lambda: torch.backends.cudnn.rnn.fp32_precision),
        ("mkldnn.matmul.fp32_precision", lambda: torch.backends.mkldnn.matmul.fp32_precision),
    ]:
        try:
            flags[name] = get()
        except (AttributeError, RuntimeError):
            flags[name] = None
    return flags


def environment(device, threads):
    env = {
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "FUSEDRNN_ALGO": os.environ.get("FUSEDRNN_ALGO", "auto"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "tf32_at_start": tf32_flags(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fusedrnn_commit": _git_commit(),
        "fusedrnn_backends": __import__("fusedrnn").backends(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
                    "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "gpu_sms": props.multi_processor_count,
                    "gpu_count": torch.cuda.device_count()})
    return env


def load_average():
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


# -- files -------------------------------------------------------------------------
def device_tag(device):
    """'cpu', or 'cuda-<gpu>' (e.g. cuda-h100-80gb-hbm3)."""
    if device != "cuda":
        return device
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def result_path(out_dir, device, set_name, stamp):
    """<tag>-<stamp>.json, one file per run (the newest of a device is its latest, see
    latest_results). Smoke runs (CI) write smoke-<tag>.json, never a dated result."""
    tag = device_tag(device)
    if set_name == "smoke":
        return out_dir / f"smoke-{tag}.json"
    return out_dir / f"{tag}-{stamp}.json"


def timestamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


# <tag>-YYYYmmdd-HHMMSS.json: within a tag, name order is time order.
_DATED = re.compile(r"^(?P<tag>.+)-\d{8}-\d{6}\.json$")


def latest_results(out_dir, prefix=""):
    """The newest dated result of every device (tag starting with `prefix`) in out_dir."""
    newest = {}
    for p in sorted(Path(out_dir).glob(f"{prefix}*.json")):
        m = _DATED.match(p.name)
        if m and not p.name.startswith("smoke-"):
            newest[m["tag"]] = p
    return sorted(newest.values())


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
    if cfg["tags"] and cfg["tags"][0] == "fastrnns":
        name += " (fastrnns)"
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


def markdown_table(doc):
    env = doc["env"]
    where = env.get("gpu") or f"{env['cpu_model']}, {env['torch_threads']} threads"
    lines = [f"{doc['device'].upper()} ({where}); torch {env['torch']}"
             + (f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if doc["device"] == "cuda" else "")
             + f"; `{doc['set']}` set, {doc['started'][:10]}. Speed-up = torch.nn time / "
             "fusedrnn time (median, same process).", "",
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
    env = doc["env"]
    where = env.get("gpu") or f"{env['cpu_model']} ({env['torch_threads']} threads)"
    fig.suptitle(f"fusedrnn speed-up over torch.nn (torch.nn time / fusedrnn time)\n"
                 f"{doc['device']}: {where}, torch {env['torch']}, {doc['set']} set, "
                 f"{doc['started'][:10]}", fontsize=9)
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
