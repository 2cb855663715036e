"""fusedrnn against FlashRNN and cuDNN on FlashRNN's own README configuration:
one LSTM layer, B=16, T=1024, I=H=768, bfloat16, one head, on a GPU.

    python -m benchmarks.flashrnn [--out-dir DIR] [--rounds N] [--T T]

FlashRNN (the `flashrnn` package, 1.0.x, its "cuda_fused" backend) is not a
dependency of fusedrnn: it is imported only here, and only when installed
(without it the row is recorded as not run). Its CUDA kernels are compiled
when first called, with torch.utils.cpp_extension (ninja and nvcc needed).

The three run the same layer with the same bfloat16 weights, the input
projection included in each:
    cudnn     torch.nn.LSTM
    fusedrnn  fusedrnn.LSTM (FUSEDRNN_ALGO as set; recorded)
    flashrnn  F.linear, then flashrnn() on FlashRNN's layout of the weights
              (flashrnn_operands: gate order i, f, g, o as torch's)
Parity first (Note [parity tolerance] in cases.py): each one's output against
torch.nn in float64 with the rounded weights upcast; fusedrnn must be within
PARITY_MULTIPLE times cuDNN's error (or the bfloat16 floor); FlashRNN's error
is recorded beside it. Then forward (inference_mode) and forward + backward
(gradients of x and every weight) are timed, interleaved (timing.py). Writes
flashrnn-<device>-readme-<stamp>.json with the environment (its "timings" are
not a bench table: results_md leaves the file out).
"""
import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedrnn
from benchmarks import cases, environment, report, timing

B, T, H = 16, 1024, 768
DTYPE = torch.bfloat16
NAMES = ("cudnn", "fusedrnn", "flashrnn")


def flashrnn_operands(x_proj, w_hh, b_hh):
    """FlashRNN's inputs for torch's LSTM layout: x_proj [T, B, 4H] (x W_ih^T
    + b_ih), w_hh [4H, H], b_hh [4H] -> Wx [B, T, 4, 1, H], R [4, 1, H, H] with
    R[g, 0, u, k] = w_hh[g H + u, k], b [4, 1, H]."""
    T_, B_, G = x_proj.shape
    H_ = G // 4
    Wx = x_proj.transpose(0, 1).reshape(B_, T_, 4, 1, H_).contiguous()
    return Wx, w_hh.reshape(4, 1, H_, H_).contiguous(), b_hh.reshape(4, 1, H_).contiguous()


def flashrnn_output(h):
    """FlashRNN's states output [S, B, T, 1, H] (S: h, c) -> h as [T, B, H]."""
    return h[0, :, :, 0, :].transpose(0, 1)


def load_flashrnn():
    try:
        from flashrnn import flashrnn
    except ImportError:
        return None
    return flashrnn


def layer_fns(net, ours, flash, x, grad_out):
    """{name: (forward(x) -> output [T, B, H])}."""
    fns = {"cudnn": lambda xx: net(xx)[0], "fusedrnn": lambda xx: ours(xx)[0]}
    if flash is not None:
        def run_flash(xx):
            x_proj = F.linear(xx, net.weight_ih_l0, net.bias_ih_l0)
            Wx, R, b = flashrnn_operands(x_proj, net.weight_hh_l0, net.bias_hh_l0)
            h, _ = flash(Wx, R, b, function="lstm", backend="cuda_fused", dtype="bfloat16")
            return flashrnn_output(h)
        fns["flashrnn"] = run_flash
    return fns


def parity(fns, net, x):
    """{name: error against float64 torch.nn}, and whether fusedrnn passes."""
    net64 = copy.deepcopy(net).double()
    with torch.inference_mode():
        want = net64(x.double())[0]
        errs = {k: cases.rel_err(f(x), want) for k, f in fns.items()}
    limit = max(cases.PARITY_MULTIPLE * errs["cudnn"], cases.PARITY_FLOOR["bfloat16"])
    return errs, errs["fusedrnn"] <= limit, limit


def steps(fns, net, ours, x, grad_out):
    """{(name, mode): no-argument step}: forward, and forward + backward with
    the gradients of x and of every weight."""
    out = {}
    for name, f in fns.items():
        params = list((ours if name == "fusedrnn" else net).parameters())
        xg = x.detach().requires_grad_(True)

        def fwd(f=f):
            with torch.inference_mode():
                f(x)

        def train(f=f, xg=xg, params=params):
            torch.autograd.grad(f(xg), [xg] + params, grad_out)

        out[(name, "forward")] = fwd
        out[(name, "forward+backward")] = train
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.flashrnn",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=report.RESULTS_DIR)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--T", type=int, default=T, help="sequence length (FlashRNN's README: 1024)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.flashrnn: no GPU visible; nothing run")
        return 0
    flash = load_flashrnn()
    if flash is None:
        print("benchmarks.flashrnn: flashrnn is not installed; its rows are not run")
    torch.manual_seed(0)
    net = torch.nn.LSTM(H, H).to("cuda", DTYPE)
    ours = fusedrnn.from_torch(net)
    x = torch.randn(args.T, B, H, device="cuda").to(DTYPE)
    grad_out = torch.randn(args.T, B, H, device="cuda").to(DTYPE)
    fns = layer_fns(net, ours, flash, x, grad_out)
    errs, ok, limit = parity(fns, net, x)
    doc = {"kind": "flashrnn", "config": {"model": "LSTM", "B": B, "T": args.T, "I": H, "H": H,
                                          "dtype": "bfloat16", "heads": 1},
           "environment": environment.record("cuda", torch.get_num_threads()),
           "parity": {"errors": errs, "fusedrnn_limit": limit, "passed": ok},
           "flashrnn_installed": flash is not None, "timings": []}
    print(f"parity against float64 torch.nn: {errs} (fusedrnn limit {limit:.3g})")
    if ok:
        stats = timing.measure({f"{k[0]} {k[1]}": fn for k, fn in steps(fns, net, ours, x,
                                                                          grad_out).items()},
                               args.rounds, args.min_run_time, torch.get_num_threads())
        for mode in ("forward", "forward+backward"):
            base = stats[f"fusedrnn {mode}"]["median_ms"]
            for name in fns:
                s = stats[f"{name} {mode}"]
                doc["timings"].append({"name": name, "mode": mode, "median_ms": s["median_ms"],
                                    "iqr_ms": s["iqr_ms"], "time_over_fusedrnn":
                                    s["median_ms"] / base})
                print(f"{mode:17s} {name:9s} {s['median_ms']:9.3f} ms  "
                      f"{s['median_ms'] / base:5.2f}x fusedrnn's time")
    else:
        print("fusedrnn fails parity: nothing timed")
    path = report.result_path(args.out_dir, "flashrnn-" + report.device_tag("cuda"), "readme", None,
                              report.timestamp())
    report.write_json(path, doc)
    print(f"results in {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
