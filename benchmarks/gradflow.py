"""The gradient-flow experiment: a plain RNN, a GRU and an LSTM on the adding problem.

    python -m benchmarks.gradflow [--steps 500] [--seq-len 200] [--out PNG] [--torch-nn]

trains a plain RNN (``torch.nn.RNN``), ``fusedrnn.GRU`` and ``fusedrnn.LSTM`` on the
adding problem (the target is the sum of two marked values far apart in a long
sequence), each once as built and once with the ``fusedrnn.init`` helpers and gradient
clipping, and writes a PNG (default ``benchmarks/results/gradflow.png``) of their
gradient norms over the time steps (``fusedrnn.gradflow.gradient_flow``) and their loss
curves, and a JSON of the numbers beside it.
"""

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

import fusedrnn
from fusedrnn import init as rnn_init
from fusedrnn.gradflow import gradient_flow

DEFAULT_PNG = "benchmarks/results/gradflow.png"
# Predicting the mean, 1, scores the variance of the sum of two U(0, 1): 2/12.
ADDING_BASELINE_MSE = 1.0 / 6.0
# The recurrent classes trained: fusedrnn's by default, torch.nn's with --torch-nn.
FUSEDRNN_CLASSES = {"RNN": nn.RNN, "GRU": fusedrnn.GRU, "LSTM": fusedrnn.LSTM}
TORCH_CLASSES = {"RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM}
# Each run: label, class key in FUSEDRNN_CLASSES, use the fusedrnn.init helpers, clip norm.
RUNS = (
    ("RNN", "RNN", False, None),
    ("RNN + init + clip", "RNN", True, 1.0),
    ("GRU", "GRU", False, None),
    ("GRU + init + clip", "GRU", True, 1.0),
    ("LSTM", "LSTM", False, None),
    ("LSTM + init + clip", "LSTM", True, 1.0),
)
_COLOURS = {"RNN": "tab:blue", "GRU": "tab:green", "LSTM": "tab:red"}
_LOSS_SMOOTHING = 10  # steps in the moving average of the plotted loss curves


def adding_problem(batch, steps, generator=None, dtype=torch.float32):
    """A batch of the adding problem.

    Returns ``x`` ``(T, B, 2)``: channel 0 values uniform in [0, 1), channel 1 two markers
    (1.0), one in each half of the sequence; and ``target`` ``(B,)``: the sum of the two
    marked values.
    """
    values = torch.rand(steps, batch, generator=generator, dtype=dtype)
    rows = torch.arange(batch)
    first = torch.randint(0, steps // 2, (batch,), generator=generator)
    second = torch.randint(steps // 2, steps, (batch,), generator=generator)
    markers = torch.zeros(steps, batch, dtype=dtype)
    markers[first, rows] = 1.0
    markers[second, rows] = 1.0
    return torch.stack([values, markers], dim=-1), values[first, rows] + values[second, rows]


class SequenceRegressor(nn.Module):
    """A recurrent layer, then a linear head on the last step: ``(T, B, I) -> (B,)``."""

    def __init__(self, rnn_cls, input_size, hidden_size, num_layers=1):
        super().__init__()
        self.rnn = rnn_cls(input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[-1]).squeeze(-1)


def train(model, steps, batch, seq_len, lr, clip=None, generator=None):
    """Adam on fresh adding-problem batches. Returns per-step ``loss`` and the gradient
    ``grad_norm`` before clipping (lists of floats)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms = [], []
    for _ in range(steps):
        x, target = adding_problem(batch, seq_len, generator)
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # With max_norm=inf this only measures the norm.
        norm = nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        optimizer.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return {"loss": losses, "grad_norm": norms}


def run_experiment(
    steps=500, seq_len=200, batch=32, hidden=64, lr=1e-2, seed=0, classes=None, log=print
):
    """Trains each of ``RUNS`` and measures its gradient flow before and after.

    ``classes``: a dict with keys ``RNN``, ``GRU``, ``LSTM`` (default ``FUSEDRNN_CLASSES``).
    Every run starts from the same seed and sees the same batches; gradient flow is
    measured on one fixed evaluation batch. Returns a JSON-ready dict.
    """
    classes = FUSEDRNN_CLASSES if classes is None else classes
    eval_x, eval_target = adding_problem(batch, seq_len, torch.Generator().manual_seed(seed + 1))
    runs = {}
    start = time.perf_counter()
    for label, key, use_init, clip in RUNS:
        run_start = time.perf_counter()
        torch.manual_seed(seed)
        model = SequenceRegressor(classes[key], 2, hidden)
        if use_init:
            rnn_init.init_rnn_(model.rnn)
        before = gradient_flow(model, eval_x, eval_target)
        curves = train(
            model, steps, batch, seq_len, lr, clip, torch.Generator().manual_seed(seed + 2)
        )
        after = gradient_flow(model, eval_x, eval_target)
        runs[label] = {
            "key": key,
            "class": f"{classes[key].__module__}.{classes[key].__qualname__}",
            "init_helpers": use_init,
            "clip": clip,
            "eval_loss_init": before["loss"],
            "eval_loss_final": after["loss"],
            "dx_init": before["dx"].tolist(),
            "dh_init": before["dh"].tolist(),
            "dx_final": after["dx"].tolist(),
            "dh_final": after["dh"].tolist(),
            **curves,
            "seconds": time.perf_counter() - run_start,
        }
        log(
            f"{label:>20}: eval loss {before['loss']:.4f} -> {after['loss']:.4f}, "
            f"dh_1/dh_T at init {before['dh'][0] / before['dh'][-1]:.2e}, "
            f"{runs[label]['seconds']:.1f} s"
        )
    return {
        "config": {
            "task": "adding",
            "steps": steps,
            "seq_len": seq_len,
            "batch": batch,
            "hidden": hidden,
            "lr": lr,
            "seed": seed,
            "optimizer": "Adam",
            "baseline_mse": ADDING_BASELINE_MSE,
        },
        "env": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "runs": runs,
        "seconds": time.perf_counter() - start,
    }


def _smooth(values, window):
    """Trailing moving average, same length as ``values``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _style(run):
    """One colour per class; dashed with the init helpers and clipping."""
    return {"color": _COLOURS.get(run["key"]), "linestyle": "--" if run["init_helpers"] else "-"}


def plot(results, path):
    """Writes the 2x2 figure of ``results`` (from :func:`run_experiment`) to ``path``."""
    # A bare Figure draws with Agg and leaves pyplot's global backend and state alone.
    from matplotlib.figure import Figure

    cfg = results["config"]
    fig = Figure(figsize=(12, 8.5))
    axes = fig.subplots(2, 2)
    panels = (
        (axes[0, 0], "dh_init", "||dLoss/dh_t|| at initialisation"),
        (axes[0, 1], "dh_final", f"||dLoss/dh_t|| after {cfg['steps']} steps"),
        (axes[1, 0], "dx_init", "||dLoss/dx_t|| at initialisation"),
    )
    for ax, key, title in panels:
        for label, run in results["runs"].items():
            # Log axes cannot show exact zeros (float32 underflow); those steps are left out.
            ax.plot([v if v > 0 else math.nan for v in run[key]], label=label, **_style(run))
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("time step t (loss at the last step)")
    ax = axes[1, 1]
    for label, run in results["runs"].items():
        ax.plot(_smooth(run["loss"], _LOSS_SMOOTHING), label=label, **_style(run))
    ax.axhline(ADDING_BASELINE_MSE, color="gray", linestyle=":", label="predict 1 (MSE 1/6)")
    ax.set_title(f"training loss (moving average of {_LOSS_SMOOTHING})")
    ax.set_xlabel("training step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"Adding problem, T={cfg['seq_len']}, hidden {cfg['hidden']}, batch {cfg['batch']}, "
        f"Adam lr {cfg['lr']}"
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None, classes=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gradflow", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--steps", type=int, default=500, help="training steps per model")
    parser.add_argument(
        "--seq-len", type=int, default=200, help="sequence length T of the adding problem"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    # One thread: the matmuls are small (hidden 64), and on a shared 2-core machine idle
    # OpenMP threads spinning made a second thread up to 6x slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--torch-nn", action="store_true", help="train torch.nn.GRU/LSTM instead of fusedrnn's"
    )
    parser.add_argument("--out", default=DEFAULT_PNG, help="PNG path; the JSON goes beside it")
    parser.add_argument("--json", default=None, help="JSON path (default: --out with .json)")
    args = parser.parse_args(argv)

    if args.torch_nn:
        classes = TORCH_CLASSES
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_experiment(
            args.steps, args.seq_len, args.batch, args.hidden, args.lr, args.seed, classes
        )
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on
    json_path = args.json or os.path.splitext(args.out)[0] + ".json"
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so an interrupted run never leaves a truncated JSON.
    with open(json_path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(json_path + ".tmp", json_path)
    plot(results, args.out)
    print(f"wrote {args.out} and {json_path} in {results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
