"""The `--regularisers` set of benchmarks/bench.py: what fusedrnn's regularisers
(layer_norm, zoneout, recurrent_dropout) cost, on the CPU in float32.

    python -m benchmarks.bench --regularisers            # T=100 B=16 I=H=256
    python -m benchmarks.bench --regularisers --smoke    # the same rows, very short timing

Per model (LSTM, GRU), mode (inference, training) and regulariser, three
functions timed in the same process, interleaved (benchmarks/timing.py):

    regularised  fusedrnn.LSTM/GRU with the option on (layer_norm=True; zoneout=0.1,
                 for the LSTM zoneout_cell=0.1 too; recurrent_dropout=0.25)
    plain        the same fusedrnn layer without it (same weights):
                 cost = regularised / plain (target for layer_norm: <= 1.3x)
    loop         the same model written as a Python loop over the time steps of an
                 nn.LSTMCell/nn.GRUCell's weights with F.layer_norm, the input
                 projection (and its LayerNorm) for all steps at once: speed-up =
                 loop / regularised (target for layer_norm: >= 5x). Timed for the
                 layer_norm rows; the other rows use it only as the parity oracle.

Parity first, as in the main set (cases.py, Note [parity tolerance]): the loop
model in float64 with the same weights is the oracle; fusedrnn's error must be
at most PARITY_MULTIPLE times the float32 loop model's, or under the float32
floor, for the output, h_n (c_n) and, in training, every gradient. In training
the loop model uses the masks fusedrnn drew (recorded through
fusedrnn.regularised.draw); in inference zoneout's expectation.
"""
import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import fusedrnn
from fusedrnn import regularised
from fusedrnn.regularisers import LN_EPS
from benchmarks import cases, configs, report, timing

KIND = "regularisers"
SUMMARY = "cost = regularised / plain fusedrnn"
CONFIGS = [configs.Config(100, 16, 256, 256, ("regularisers",))]
SMOKE_CONFIGS = CONFIGS
VARIANTS = {"layer_norm": dict(layer_norm=True),
            "zoneout": dict(zoneout=0.1, zoneout_cell=0.1),
            "recurrent_dropout": dict(recurrent_dropout=0.25)}
LOOP_TIMED = ("layer_norm",)
TARGETS = {"layer_norm": {"cost_max": 1.3, "speedup_vs_loop_min": 5.0}}
PRECISION = configs.PRECISIONS["float32"]
NOTE = ("cost = fusedrnn with the regulariser / the plain fusedrnn layer; speed-up vs loop = the "
        "same model as a Python loop over time steps with nn.LSTMCell/nn.GRUCell weights and "
        "F.layer_norm / fusedrnn; options: " + "; ".join(
            f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in VARIANTS.items())
        + " (zoneout_cell for the LSTM only)")

TIMING_DOC = {"cost": "regularised median / plain fusedrnn median (same process)",
              "speedup_vs_loop": "Python loop median / regularised median",
              "training": "forward + backward of (output * fixed random weights).sum()",
              "inference": "torch.inference_mode(), modules in eval()"}
PARITY_DOC = {"oracle": "the Python loop model in float64, same weights, the masks fusedrnn "
                        "drew (training) or zoneout's expectation (inference)",
              "rule": "err(fusedrnn) <= max(multiple * err(float32 loop), floor)",
              "multiple": cases.PARITY_MULTIPLE, "floor": cases.PARITY_FLOOR[PRECISION.name]}


class LoopRNN(nn.Module):
    """One layer as a Python loop over time steps, with an nn.LSTMCell's (or
    nn.GRUCell's) weights and the LayerNorm gains as parameters; the input
    projection (and its LayerNorm) of all steps at once.
    masks: None (eval: zoneout's expectation) or {"zone_h", "zone_c", "rec"}."""

    def __init__(self, model, I, H, opts):
        super().__init__()
        self.lstm, self.H, self.opts = model == "LSTM", H, opts
        self.cell = (nn.LSTMCell if self.lstm else nn.GRUCell)(I, H)
        G = 4 if self.lstm else 3
        if opts.layer_norm:
            self.g_ih = nn.Parameter(torch.ones(G * H))
            self.g_hh = nn.Parameter(torch.ones(G * H))
            if self.lstm:
                self.g_c, self.b_c = nn.Parameter(torch.ones(H)), nn.Parameter(torch.zeros(H))

    def names(self):
        """{fusedrnn parameter name: this module's}."""
        out = {f"{w}_l0": f"cell.{w}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        if self.opts.layer_norm:
            out.update(layernorm_ih_weight_l0="g_ih", layernorm_hh_weight_l0="g_hh")
            if self.lstm:
                out.update(layernorm_c_weight_l0="g_c", layernorm_c_bias_l0="b_c")
        return out

    def forward(self, x, hx, masks=None):
        c, o = self.cell, self.opts
        if o.layer_norm:
            xw = F.linear(x, c.weight_ih)
            xs = F.layer_norm(xw, xw.shape[-1:], self.g_ih, c.bias_ih, LN_EPS)
        else:
            xs = F.linear(x, c.weight_ih, c.bias_ih)
        h, cs = (hx[0][0], hx[1][0]) if self.lstm else (hx[0], None)
        masks = masks or {}
        rec = masks.get("rec")
        outs = []
        for t in range(x.shape[0]):
            a_h = F.linear(h if rec is None else h * rec, c.weight_hh)
            if o.layer_norm:
                a_h = F.layer_norm(a_h, a_h.shape[-1:], self.g_hh, None, LN_EPS)
            a_h = a_h + c.bias_hh
            if self.lstm:
                i, f, g, og = (xs[t] + a_h).chunk(4, -1)
                c_new = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(g)
                cn = F.layer_norm(c_new, (self.H,), self.g_c, self.b_c, LN_EPS) \
                    if o.layer_norm else c_new
                h_new = torch.sigmoid(og) * torch.tanh(cn)
                zc = masks["zone_c"][t] if "zone_c" in masks else o.zoneout_cell
                cs = zc * cs + (1 - zc) * c_new if o.zoneout_cell else c_new
            else:
                xr, xz, xn = xs[t].chunk(3, -1)
                hr, hz, hn = a_h.chunk(3, -1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
            zh = masks["zone_h"][t] if "zone_h" in masks else o.zoneout
            h = zh * h + (1 - zh) * h_new if o.zoneout else h_new
            outs.append(h)
        out = torch.stack(outs)
        return (out, (h[None], cs[None])) if self.lstm else (out, h[None])


@contextlib.contextmanager
def recorded_masks(opts, lstm):
    """Records the masks fusedrnn draws inside (regularised.draw) as the loop
    model's masks (one layer, one direction: zone_h, zone_c, rec_mask in order)."""
    drawn, real = [], regularised.draw

    def record(shape, p, like):
        m = real(shape, p, like)
        drawn.append(m)
        return m

    masks = {}
    regularised.draw = record
    try:
        yield masks
    finally:
        regularised.draw = real
    if not drawn:  # eval mode
        return
    it = iter(drawn)
    if opts.zoneout > 0:
        masks["zone_h"] = next(it)
    if opts.zoneout_cell > 0 and lstm:
        masks["zone_c"] = next(it)
    if opts.recurrent_dropout > 0:
        masks["rec"] = next(it) / (1 - opts.recurrent_dropout)


class RegCase(cases.Case):
    """A regularised fusedrnn layer, its plain twin and its loop model, with the
    inputs of cases.Case (same seed: the same x, h0, c0 and output weighting)."""

    def __init__(self, model, variant, cfg, seed):
        super().__init__(model, cfg, PRECISION, "cpu", seed)
        self.variant, self.opts = variant, regularised.Options(**{
            k: v for k, v in VARIANTS[variant].items() if self.lstm or k != "zoneout_cell"})
        self.plain = self.fused_mod
        self.reg = fusedrnn.from_torch(self.torch_mod, **regularised.non_default(self.opts))
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():  # LayerNorm parameters away from 1 and 0
            for n, p in self.reg.named_parameters():
                if regularised.is_ln_parameter(n):
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        self.loop = LoopRNN(model, cfg.I, cfg.H, self.opts)
        mine = dict(self.loop.named_parameters())
        with torch.no_grad():
            for theirs, ours in self.loop.names().items():
                mine[ours].copy_(getattr(self.reg, theirs))

    def step(self, which, mode):
        mod = {"regularised": self.reg, "plain": self.plain, "loop": self.loop}[which]
        if mode == "inference":
            mod.eval()
            x, h0, c0 = self._inputs(False)

            def run():
                with torch.inference_mode():
                    mod(x, self._hx(h0, c0))
            return run
        mod.train()
        x, h0, c0 = self._inputs(True)
        leaves, g = [x, h0, c0, *mod.parameters()], self.grad_out

        def run():
            for t in leaves:
                t.grad = None
            mod(x, self._hx(h0, c0))[0].backward(g)
        return run

    def _named_results(self, mod, mode, dtype, masks=None):
        x, h0, c0 = (t.detach().to(dtype).requires_grad_(mode == "training")
                     for t in (self.x, self.h0, self.c0))
        mod.train(mode == "training")
        args = (x, self._hx(h0, c0)) + ((masks,) if isinstance(mod, LoopRNN) else ())
        with torch.inference_mode(mode == "inference"):
            out, hn = mod(*args)
        res = self._named(out, hn)
        if mode == "training":
            mod.zero_grad(set_to_none=True)
            out.backward(self.grad_out.to(dtype))
            res.update(grad_x=x.grad, grad_h0=h0.grad)
            if self.lstm:
                res["grad_c0"] = c0.grad
            names = self.loop.names() if isinstance(mod, LoopRNN) else None
            params = dict(mod.named_parameters())
            for n in self.loop.names():
                res["grad_" + n] = params[names[n] if names else n].grad
            mod.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in res.items()}

    def parity(self, mode):
        """fusedrnn and the float32 loop model against the float64 loop model, with
        the masks fusedrnn drew (Note [parity tolerance] in cases.py)."""
        with recorded_masks(self.opts, self.lstm) as masks:
            got_f = self._named_results(self.reg, mode, torch.float32)
        masks = masks if mode == "training" else None
        got_l = self._named_results(self.loop, mode, torch.float32, masks)
        loop64 = copy.deepcopy(self.loop).double()
        m64 = None if masks is None else {k: v.double() for k, v in masks.items()}
        want = self._named_results(loop64, mode, torch.float64, m64)
        floor = cases.PARITY_FLOOR[PRECISION.name]
        worst, passed = None, True
        for name, w in want.items():
            e_l, e_f = cases.rel_err(got_l[name], w), cases.rel_err(got_f[name], w)
            allowed = max(cases.PARITY_MULTIPLE * e_l, floor)
            ok = e_f <= allowed
            passed &= ok
            score = e_f / allowed if ok or e_f > allowed else math.inf
            if worst is None or score > worst[0]:
                worst = (score, {"tensor": name, "fused_err": e_f, "loop_err": e_l,
                                 "allowed": allowed})
        return {"passed": bool(passed), **worst[1]}


def row_specs(models, cfgs, modes):
    """The set's rows, in order, as run_row's keyword arguments."""
    return [dict(model=m, variant=v, config=c, mode=mode)
            for m in models for v in VARIANTS for c in cfgs for mode in modes]


def run_row(model, variant, config, mode, seed, timing_args):
    """Parity, then interleaved timing. Returns the row's fields."""
    case = RegCase(model, variant, config, seed)
    row = {"model": model, "variant": variant, "options": case.opts._asdict(),
           "config": config.as_dict(), "precision": PRECISION.name, "mode": mode}
    row["parity"] = case.parity(mode)
    if not row["parity"]["passed"]:
        row["status"] = "parity-failed"
        return row
    names = ["regularised", "plain"] + (["loop"] if variant in LOOP_TIMED else [])
    stats = timing.measure({n: case.step(n, mode) for n in names}, *timing_args)
    r, p = stats["regularised"]["median_ms"], stats["plain"]["median_ms"]
    row.update(status="ok", regularised_ms=r, plain_ms=p, cost=r / p,
               cost_round_range=timing.ratio_range(stats["regularised"], stats["plain"]))
    if "loop" in stats:
        row.update(loop_ms=stats["loop"]["median_ms"],
                   speedup_vs_loop=stats["loop"]["median_ms"] / r)
    row["targets"] = TARGETS.get(variant)
    row["timing"] = stats
    return row


COLUMNS = ["model", "regulariser", "config", "mode", "regularised ms", "plain ms",
           "cost (reg/plain)", "loop ms", "speed-up vs loop"]


def row_cells(row):
    cfg = row["config"]
    head = [row["model"], row["variant"], f"T={cfg['T']} B={cfg['B']} I={cfg['I']} H={cfg['H']}",
            row["mode"]]
    if row["status"] != "ok":
        p = row.get("parity") or {}
        why = row.get("error") or (f"{p.get('tensor')} err {p.get('fused_err', 0):.2e} > "
                                   f"allowed {p.get('allowed', 0):.2e}")
        return head + [f"{row['status'].upper()}: {why}", "", "", "", ""]
    ms = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    loop = row.get("loop_ms")
    return head + [ms(row["regularised_ms"]), ms(row["plain_ms"]), f"{row['cost']:.2f}x",
                   ms(loop), "-" if loop is None else f"{row['speedup_vs_loop']:.1f}x"]


def text_table(rows):
    return report.plain_table(COLUMNS, [row_cells(r) for r in rows])


def markdown(doc):
    """RESULTS.md's table of a --regularisers result."""
    return report.set_markdown(
        doc, "Cost = regularised time / plain fusedrnn time; speed-up = Python loop time / "
        "regularised time (medians, same process).", COLUMNS, [row_cells(r) for r in doc["rows"]],
        4)
