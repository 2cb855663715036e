"""Lower bounds on the time of one LSTM/GRU layer on a GPU (benchmarks/NOTES.md).

    python -m benchmarks.floors                       # the table, datasheet rates (H100 SXM)
    python -m benchmarks.floors --results DIR ...     # with measured medians from bench JSON
    python -m benchmarks.floors --measure-barrier     # on a GPU: time one persistent step
    python -m benchmarks.floors --layouts             # the persistent kernel's layouts on an H100

For each config three floors, in microseconds:
  flops  the FLOPs over the rate of the unit that does them (SIMT fp32, TF32 or
         bf16 tensor cores; RATES);
  bytes  each input read once and each output written once, over HBM bandwidth;
  chain  T dependent steps (forward; 2T with backward), each at least one grid
         barrier (persistent) or kernel launch (step-wise), times its latency.
The largest is the floor; measured time over it is the gap.
"""
import argparse
import json
import sys
from pathlib import Path

# Ceilings of an H100 (80GB HBM3, 132 SMs), measured outside this project
# (2026-11-13): a device-to-device copy at ~3.0 TB/s counting bytes
# read and written; an 8192^3 bf16 matmul at 798 TFLOP/s. Not measured there: fp32
# SIMT and TF32, scaled here from the datasheet's dense rates by bf16's measured
# fraction (798 / 989). --bandwidth and --barrier-us override.
HBM_BYTES_PER_S = 3.0e12
_MEASURED_FRACTION = 798 / 989.4
RATES = {"float32": 67e12 * _MEASURED_FRACTION, "tf32": 494.7e12 * _MEASURED_FRACTION,
         "bfloat16": 798e12, "float16": 798e12}
BYTES = {"float32": 4, "tf32": 4, "bfloat16": 2, "float16": 2}
# Latency of one grid-wide barrier with ~132 blocks, assumed until measured
# (--measure-barrier); a dependent kernel launch costs about as much or more.
BARRIER_US = 1.0
GATES = {"LSTM": 4, "GRU": 3}
CONFIGS = [(100, B, H) for H in (256, 512, 1024) for B in (1, 8, 16, 64)]


def floors(model, T, B, H, precision, training, rate=None, bandwidth=HBM_BYTES_PER_S,
           barrier_us=BARRIER_US):
    """(flops_us, bytes_us, chain_us) with I = H."""
    G, e, I = GATES[model], BYTES[precision], H
    fwd_flops = 2 * T * B * G * H * (I + H)  # input projection + recurrent matmul
    weights = G * H * (I + H) * e
    io = T * B * (I + H) * e  # x in, output out
    saved = T * B * G * H * e  # gates kept for backward
    if training:
        # backward: dh (recurrent), dW_hh, dW_ih, dx: three forward-sized products in all.
        flops = 3 * fwd_flops
        # x, weights and saved gates read again; grad_out in; dx, dW out.
        nbytes = 2 * (io + weights) + 2 * saved + T * B * H * e + T * B * I * e + weights
        steps = 2 * T
    else:
        flops, nbytes, steps = fwd_flops, io + weights, T
    return (flops / (rate or RATES[precision]) * 1e6, nbytes / bandwidth * 1e6,
            steps * barrier_us)


def measured(paths):
    """{(model, T, B, H, precision, mode): (torch_ms, fused_ms)} from bench JSON files."""
    from benchmarks import report  # loads torch: only when results are read

    out = {}
    for p in paths:
        newest = [] if p.is_file() else report.newest_results(p, "bench", recursive=False)
        for path in [p] if p.is_file() else [q for q in newest if q.name.startswith("cuda-")]:
            doc = json.loads(path.read_text())
            for r in doc.get("rows", []):
                if r.get("status") != "ok":
                    continue
                c = r["config"]
                key = (r["model"], c["T"], c["B"], c["H"], r["precision"], r["mode"])
                out[key] = (r["torch_ms"], r["fused_ms"])
    return out


PRECISIONS = ("float32", "tf32", "bfloat16")
MODES = ("inference", "training")
TERM = ("flops", "bytes", "chain")


def table(results, args):
    """One row per model and config; per precision and mode the floor in µs
    and its largest term, then (when measured) cuDNN and fusedrnn in µs."""
    cols = [(p, m) for p in PRECISIONS for m in MODES]
    head = "| model | T | B | H | " + " | ".join(f"{p} {m[:5]}" for p, m in cols) + " |"
    lines = [head, "|" + "---|" * (4 + len(cols))]
    for model in ("LSTM", "GRU"):
        for T, B, H in CONFIGS:
            cells = []
            for precision, mode in cols:
                f = floors(model, T, B, H, precision, mode == "training",
                           barrier_us=args.barrier_us, bandwidth=args.bandwidth)
                floor = max(f)
                cell = f"{floor:.0f} {TERM[f.index(floor)]}"
                t = results.get((model, T, B, H, precision, mode))
                if t is not None:
                    cell += f"; cuDNN {t[0] * 1e3:.0f}, ours {t[1] * 1e3:.0f}"
                cells.append(cell)
            lines.append(f"| {model} | {T} | {B} | {H} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LAYOUT_PATHS = (("fp32 SIMT", 0, 4), ("tf32", 1, 4), ("bf16", 1, 2))  # (name, mode, element bytes)


def layouts():
    """The persistent kernel's layout per path and config on an H100, from the
    kernel's own layout function (csrc/persistent/layout.h, make_layout)."""
    from fusedrnn._ops import H100_SMEM, H100_SMS, persistent_layout

    def cell(L):
        if L["bytes"] > H100_SMEM:
            return f"does not fit ({L['bytes'] / 1024:.0f} KB): step-wise"
        chunks = f"{L['chunks']}" + (" (2 buffers)" if L["buffers"] == 2 else "")
        return f"{L['blocks']} × {L['units']}, {chunks}, {L['bytes'] / 1024:.0f}"

    lines = ["| path | model | H | B | forward: blocks × units, chunks, smem KB "
             "| backward: blocks × units, chunks, smem KB |", "|---|---|---|---|---|---|"]
    for name, mode, elt in LAYOUT_PATHS:
        for H in (256, 512, 1024):
            for B in (1, 64):
                for model in ("LSTM", "GRU"):
                    f, b = (persistent_layout(H, B, GATES[model], bwd, mode, elt, 4, H100_SMS,
                                              H100_SMEM) for bwd in (False, True))
                    lines.append(f"| {name} | {model} | {H} | {B} | {cell(f)} | {cell(b)} |")
    return "\n".join(lines)


def measure_barrier(steps=2000, H=256):
    """Median time per step of the persistent GRU forward at B=1: the step's
    work is tiny, so this is the grid barrier plus one L2 round trip."""
    import torch

    import fusedrnn  # noqa: F401

    ops = torch.ops.fusedrnn
    x = torch.randn(steps, 1, 3 * H, device="cuda")
    h0 = torch.randn(1, H, device="cuda")
    w = torch.randn(3 * H, H, device="cuda") / H ** 0.5

    def run(T):
        return ops._persistent_gru_forward(x[:T], h0, w, None, None, False, False, 0, 0, 0)

    times = {}
    for T in (steps // 2, steps):
        run(T)
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        samples = []
        for _ in range(9):
            ev[0].record()
            run(T)
            ev[1].record()
            torch.cuda.synchronize()
            samples.append(ev[0].elapsed_time(ev[1]))
        times[T] = sorted(samples)[len(samples) // 2]
    per_step_us = (times[steps] - times[steps // 2]) / (steps // 2) * 1e3
    return {"gpu": torch.cuda.get_device_name(0), "H": H, "B": 1,
            "per_step_us": per_step_us, "median_ms": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="*", type=Path, default=[],
                   help="bench JSON files, or folders: the newest CUDA results in them")
    p.add_argument("--barrier-us", type=float, default=BARRIER_US)
    p.add_argument("--bandwidth", type=float, default=HBM_BYTES_PER_S, help="bytes/s")
    p.add_argument("--measure-barrier", action="store_true")
    p.add_argument("--layouts", action="store_true")
    args = p.parse_args(argv)
    if args.layouts:
        print(layouts())
        return 0
    if args.measure_barrier:
        print(json.dumps(measure_barrier()))
        return 0
    print(table(measured(args.results), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
