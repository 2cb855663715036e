"""The `--cells` set of benchmarks/bench.py: one step a call, as a decoder's
loop makes them: fusedrnn.LSTMCell/GRUCell against torch.nn.LSTMCell/GRUCell,
and fusedrnn.LSTM/GRU called on one step against torch.nn.LSTM/GRU, on the CPU
in float32.

    python -m benchmarks.bench --cells            # B in {1, 16, 64}, I=H in {256, 1024}
    python -m benchmarks.bench --cells --smoke    # B=1 I=H=256, very short timing

At small sizes what this measures is mostly a call's fixed cost (argument
checks, dtype planning, autograd), at larger ones the two products. Per model,
size and mode, both twins are timed in the same process, interleaved
(timing.py); speed-up = torch.nn / fusedrnn:

    inference  one call under torch.inference_mode(), both models in eval()
    training   one call, then the backward of (h * w).sum() (LSTM: plus
               (c * w_c).sum()) for fixed random w: the gradients of the input,
               the state and every weight, set to None before each call

Parity first (cases.py, Note [parity tolerance]): torch.nn's model in float64
with the same weights and inputs is the oracle for h (c) and, in training,
every gradient. Configs are written T=1 (`--config 1,B,I,H`); the layers run
one step whatever T says.
"""
import copy

import torch
from torch import nn

import fusedrnn
from benchmarks import cases, configs, report, timing

KIND = "cells"
SUMMARY = "speed-up = torch.nn / fusedrnn"
CONFIGS = [configs.Config(1, B, H, H, ("cells",)) for B in (1, 16, 64) for H in (256, 1024)]
SMOKE_CONFIGS = CONFIGS[:1]
MODELS = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "LSTM": nn.LSTM, "GRU": nn.GRU}
PRECISION = configs.PRECISIONS["float32"]
NOTE = ("one call per timed call (one step: a cell, or a layer on one step), with the input's "
        "and the states' gradients in training; speed-up = torch.nn / fusedrnn, medians of the "
        "same process")
TIMING_DOC = {"speedup": "torch.nn median / fusedrnn median (same process)",
              "training": "one call, then backward of (h * w).sum() (+ (c * w_c).sum())",
              "inference": "torch.inference_mode(), cells in eval()"}
PARITY_DOC = {"oracle": "torch.nn's cell in float64, same weights and inputs",
              "rule": "err(fusedrnn) <= max(multiple * err(torch.nn), floor)",
              "multiple": cases.PARITY_MULTIPLE, "floor": cases.PARITY_FLOOR[PRECISION.name]}


class CellCase:
    """torch.nn's cell (or layer on one step), its fusedrnn twin and the inputs
    of one row, drawn in float32 from `seed`."""

    def __init__(self, model, cfg, seed):
        self.name, self.lstm = model, model.startswith("LSTM")
        self.layer = not model.endswith("Cell")
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.torch_mod = MODELS[model](cfg.I, cfg.H)
        self.fused_mod = fusedrnn.from_torch(self.torch_mod)
        step = (1,) if self.layer else ()  # a layer's input and states: one step, one layer
        draw = lambda *shape: torch.randn(*step, *shape, generator=gen)  # noqa: E731
        self.x = draw(cfg.B, cfg.I)
        self.states = [cases.H_STATE_SCALE * draw(cfg.B, cfg.H) for _ in range(1 + self.lstm)]
        self.weights = [draw(cfg.B, cfg.H) for _ in self.states]  # loss = sum (s * w).sum()

    def _call(self, mod, x, states):
        """The new states, as a tuple."""
        out = mod(x, tuple(states) if self.lstm else states[0])
        if self.layer:
            out = out[1]
        return out if self.lstm else (out,)

    def step(self, which, mode):
        mod = self.torch_mod if which == "torch" else self.fused_mod
        mod.train(mode == "training")
        if mode == "inference":
            def run():
                with torch.inference_mode():
                    self._call(mod, self.x, self.states)
            return run
        leaves = [t.detach().requires_grad_() for t in (self.x, *self.states)]
        params = list(mod.parameters())

        def run():
            for t in leaves + params:
                t.grad = None
            out = self._call(mod, leaves[0], leaves[1:])
            sum((o * w).sum() for o, w in zip(out, self.weights)).backward()
        return run

    def _results(self, mod, mode, dtype):
        """{name: tensor}: the new states and, in training, every gradient."""
        mod = copy.deepcopy(mod).to(dtype).train(mode == "training")
        leaves = [t.detach().to(dtype).requires_grad_(mode == "training")
                  for t in (self.x, *self.states)]
        with torch.inference_mode(mode == "inference"):
            out = self._call(mod, leaves[0], leaves[1:])
        res = {n: o for n, o in zip(("h", "c"), out)}
        if mode == "training":
            sum((o * w.to(dtype)).sum() for o, w in zip(out, self.weights)).backward()
            res.update({f"grad_{n}": t.grad for n, t in zip(("x", "h0", "c0"), leaves)})
            res.update({f"grad_{n}": p.grad for n, p in mod.named_parameters()})
        return {k: v.detach() for k, v in res.items()}

    def parity(self, mode):
        """fusedrnn and torch.nn in float32 against torch.nn in float64."""
        got_f = self._results(self.fused_mod, mode, torch.float32)
        got_t = self._results(self.torch_mod, mode, torch.float32)
        want = self._results(self.torch_mod, mode, torch.float64)
        worst = None
        for name, w in want.items():
            e_t, e_f = cases.rel_err(got_t[name], w), cases.rel_err(got_f[name], w)
            allowed = max(cases.PARITY_MULTIPLE * e_t, PARITY_DOC["floor"])
            score = e_f / allowed
            if worst is None or score > worst[0]:
                worst = (score, {"tensor": name, "fused_err": e_f, "torch_err": e_t,
                                 "allowed": allowed})
        return {"passed": bool(worst[0] <= 1), **worst[1]}


def row_specs(models, cfgs, modes):
    """The set's rows, in order, as run_row's keyword arguments (models: LSTM,
    GRU, as for the other sets)."""
    return [dict(model=name, config=c, mode=mode)
            for m in models for name in (m + "Cell", m) for c in cfgs for mode in modes]


def run_row(model, config, mode, seed, timing_args):
    """Parity, then interleaved timing. Returns the row's fields."""
    case = CellCase(model, config, seed)
    row = {"model": model, "config": config.as_dict(), "precision": PRECISION.name,
           "mode": mode, "parity": case.parity(mode)}
    if not row["parity"]["passed"]:
        row["status"] = "parity-failed"
        return row
    stats = timing.measure({n: case.step(n, mode) for n in ("torch", "fused")}, *timing_args)
    t, f = stats["torch"]["median_ms"], stats["fused"]["median_ms"]
    row.update(status="ok", torch_ms=t, fused_ms=f, speedup=t / f,
               speedup_round_range=timing.ratio_range(stats["torch"], stats["fused"]),
               timing=stats)
    return row


COLUMNS = ["model", "config", "mode", "torch.nn us", "fusedrnn us", "speed-up"]


def row_cells(row):
    cfg = row["config"]
    head = [row["model"], f"B={cfg['B']} I={cfg['I']} H={cfg['H']}", row["mode"]]
    if row["status"] != "ok":
        p = row.get("parity") or {}
        why = row.get("error") or (f"{p.get('tensor')} err {p.get('fused_err', 0):.2e} > "
                                   f"allowed {p.get('allowed', 0):.2e}")
        return head + [f"{row['status'].upper()}: {why}", "", ""]
    return head + [f"{1e3 * row['torch_ms']:.1f}", f"{1e3 * row['fused_ms']:.1f}",
                   f"{row['speedup']:.2f}x"]


def text_table(rows):
    return report.plain_table(COLUMNS, [row_cells(r) for r in rows])


def markdown(doc):
    """RESULTS.md's table of a --cells result."""
    return report.set_markdown(
        doc, "Speed-up = torch.nn time / fusedrnn time (medians, same process); one cell call "
        "per timed call.", COLUMNS, [row_cells(r) for r in doc["rows"]], 3)
