"""Differential fuzzing against torch.nn: seeded random configurations, every
output, state and gradient compared.

    python -m tests.fuzz --n 10000 [--seed 0] [--start 0] [--threads 1] [--wide]

prints each mismatch (with the index that reproduces it: --start I --n 1) and
a summary line. A slice runs in the test suite (tests/test_fuzz.py).

Tolerances. Errors are max|ours - want| / max|want| per tensor, where
max|want| is at least CANCEL_SCALE (1%) of the largest value of all the
tensors compared (see check). float64: at most 1e-10 against torch.nn.
float32 and bfloat16 follow tests/test_ops.py: both run on the same rounded
inputs and weights, and against torch.nn in float64 on those values our
relative error must be at most 4x torch.nn's own error at that dtype plus a
floor (FLOOR: a few units of rounding, so that a tensor torch happens to get
almost exactly right does not fail us; for bfloat16, 16 units of 2^-8: at
hidden_size 1 the tensors hold one to four values, and the input projection,
each layer's output and the weight gradients are rounded to bfloat16 on both
sides, so single calls reach 10 units where torch.nn's draw happened to be
small; a wrong index or gate still errs by order 1). float32 is held to the contract
instead (the project's 1e-5 relative), or to 4x torch.nn's error where that is
larger (a few values that cancel, e.g. hidden_size 1): with one to three
values per tensor, the ratio of two rounding errors is a heavy-tailed draw
(over 300 random GRU(8, 1) calls our float32 d_h0 errors have the same
median and 95th percentile as torch.nn's), so a per-call ratio is no test
there.
"""
import argparse
import random
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 16 * 2.0 ** -8}
FP32_LIMIT = 1e-5
FP64_TOL = 1e-10
CANCEL_SCALE = 0.01
LAYOUTS = ("padded", "unbatched", "packed", "packed_unsorted")


# (input_size, hidden_size, batch, steps, num_layers) choices; wide: sizes where
# the CPU's fused path runs several panels of units, whole vectors and tails,
# tiles of rows and blocks of depth (K over 512, over 1024), in fewer layers.
SIZES = {False: ([1, 2, 3, 5, 8, 17], [1, 2, 3, 4, 7, 16], [1, 2, 3, 5], [1, 2, 3, 5, 8],
                 [1, 1, 2, 3]),
         True: ([1, 31, 100, 257, 513, 1100], [17, 63, 64, 65, 129, 200],
                [1, 2, 5, 7, 13, 17, 33, 70], [1, 2, 7, 19], [1, 1, 2])}


def config(rng, wide=False):
    """One random configuration, as a dict of plain values."""
    inputs, hiddens, batches, steps, layers = SIZES[wide]
    kind = rng.choice(["LSTM", "GRU", "LSTMCell", "GRUCell"])
    c = dict(kind=kind, input_size=rng.choice(inputs),
             hidden_size=rng.choice(hiddens), bias=rng.random() < 0.8,
             dtype=rng.choice(DTYPES), hx=rng.random() < 0.5, batch=rng.choice(batches))
    if kind.endswith("Cell"):
        c["layout"] = rng.choice(["batched", "unbatched"])
        return c
    c.update(num_layers=rng.choice(layers), bidirectional=rng.random() < 0.5,
             batch_first=rng.random() < 0.5, layout=rng.choice(LAYOUTS),
             steps=rng.choice(steps))
    if kind == "LSTM" and c["hidden_size"] > 1 and rng.random() < 0.3:
        c["proj_size"] = rng.randrange(1, c["hidden_size"])
    return c


def _module_kwargs(c):
    keys = ("bias", "num_layers", "bidirectional", "batch_first", "proj_size")
    return {k: c[k] for k in keys if k in c}


def _leaves(c, module, gen):
    """Float64 leaves {x, h0, c0} of one call and the packed lengths (or None)."""
    opts = dict(dtype=torch.float64, generator=gen)
    B, I, H = c["batch"], c["input_size"], c["hidden_size"]
    lstm = c["kind"].startswith("LSTM")
    if c["kind"].endswith("Cell"):
        lead = (B,) if c["layout"] == "batched" else ()
        d = {"x": torch.randn(*lead, I, **opts)}
        if c["hx"]:
            d["h0"] = torch.randn(*lead, H, **opts)
            if lstm:
                d["c0"] = torch.randn(*lead, H, **opts)
        return d, None
    T = c["steps"]
    n = module.num_layers * (2 if module.bidirectional else 1)
    P = c.get("proj_size") or H
    lengths = None
    if c["layout"] == "unbatched":
        d, lead = {"x": torch.randn(T, I, **opts)}, (n,)
    else:
        d = {"x": torch.randn(*((B, T) if c["batch_first"] else (T, B)), I, **opts)}
        lead = (n, B)
        if c["layout"].startswith("packed"):
            lengths = [T] + [int(torch.randint(1, T + 1, (1,), generator=gen)) for _ in range(B - 1)]
            if c["layout"] == "packed":
                lengths.sort(reverse=True)
            else:
                perm = torch.randperm(B, generator=gen).tolist()
                lengths = [lengths[i] for i in perm]
    if c["hx"]:
        d["h0"] = torch.randn(*lead, P, **opts)
        if lstm:
            d["c0"] = torch.randn(*lead, H, **opts)
    return d, lengths


def _run(c, module, leaves, lengths, weights):
    """Outputs and gradients (of every leaf and parameter) of one call."""
    x = leaves["x"]
    if lengths is not None:
        x = pack_padded_sequence(x, lengths, batch_first=c["batch_first"],
                                 enforce_sorted=c["layout"] == "packed")
    hx = None
    if "h0" in leaves:
        hx = (leaves["h0"], leaves["c0"]) if "c0" in leaves else leaves["h0"]
    res = module(x) if hx is None else module(x, hx)
    if isinstance(res, torch.Tensor):
        outs = [res]
    elif c["kind"] == "LSTMCell":
        outs = list(res)
    else:
        out, hidden = res
        out = out.data if isinstance(out, PackedSequence) else out
        outs = [out] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    if weights is None:
        g = torch.Generator().manual_seed(7)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    wrt = list(leaves.values()) + list(module.parameters())
    names = list(leaves) + [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, wrt)
    return dict(zip([f"out{k}" for k in range(len(outs))] + [f"d_{n}" for n in names],
                    [o.detach() for o in outs] + list(grads))), weights


def _rel_err(a, e, scale=0.0):
    """max|a - e| / max(max|e|, scale)."""
    a, e = a.double(), e.double()
    if not e.numel():
        return 0.0
    return ((a - e).abs().max() / e.abs().max().clamp_min(max(scale, 1e-30))).item()


def check(index, seed=0, wide=False):
    """Runs configuration `index`; returns (config, list of mismatch strings)."""
    rng = random.Random(seed * 1_000_003 + index)
    c = config(rng, wide)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    torch.manual_seed(seed * 1_000_003 + index)
    ref64 = getattr(nn, c["kind"])(c["input_size"], c["hidden_size"], **_module_kwargs(c)).double()
    dtype = c["dtype"]
    with torch.no_grad():  # the weights and inputs the low-precision runs see, exactly
        for p in ref64.parameters():
            p.copy_(p.to(dtype))
    leaves64, lengths = _leaves(c, ref64, gen)
    leaves64 = {k: v.to(dtype).double() for k, v in leaves64.items()}
    low = lambda: {k: v.to(dtype).requires_grad_() for k, v in leaves64.items()}  # noqa: E731
    ref_low = getattr(nn, c["kind"])(c["input_size"], c["hidden_size"], **_module_kwargs(c))
    ref_low = ref_low.to(dtype)
    ref_low.load_state_dict(ref64.state_dict())
    ours = fusedrnn.from_torch(ref_low)
    errors = []
    try:
        want, w = _run(c, ref64, {k: v.clone().requires_grad_() for k, v in leaves64.items()},
                       lengths, None)
        got, _ = _run(c, ours, low(), lengths, w)
        theirs = _run(c, ref_low, low(), lengths, w)[0] if dtype != torch.float64 else None
    except Exception as e:  # noqa: BLE001  (a crash is a finding)
        return c, [f"raised {type(e).__name__}: {str(e).splitlines()[0]}"]
    # Note: a tensor that is small because its terms cancel (hidden_size 1: one
    # h0 gradient of 7e-5 from terms near 0.1) is measured against the scale of
    # the terms, taken as CANCEL_SCALE of the largest value compared.
    scale = CANCEL_SCALE * max((e.abs().max().item() for e in want.values() if e.numel()),
                               default=0.0)
    for name, e in want.items():
        a = got[name]
        if a.shape != e.shape or a.dtype != (theirs or want)[name].dtype:
            errors.append(f"{name}: shape/dtype {tuple(a.shape)} {a.dtype}, "
                          f"want {tuple(e.shape)} {(theirs or want)[name].dtype}")
            continue
        ours_err = _rel_err(a, e, scale)
        if dtype == torch.float64:
            if not ours_err <= FP64_TOL:
                errors.append(f"{name}: rel err {ours_err:.3g} > {FP64_TOL}")
            continue
        torch_err = _rel_err(theirs[name], e, scale)
        bound = 4 * torch_err + FLOOR[dtype]
        if dtype == torch.float32:
            bound = max(FP32_LIMIT, 4 * torch_err)
        if not ours_err <= bound:
            errors.append(f"{name}: rel err {ours_err:.3g} > {bound:.3g} (torch.nn {torch_err:.3g})")
    return c, errors


def run(n, seed=0, start=0, threads=1, out=sys.stdout, wide=False):
    """Checks configurations start..start+n-1; prints mismatches and a summary.
    Returns the number of mismatching configurations. The sizes are tiny, so
    by default one thread: waking a pool per op costs more than the work,
    many times over on a loaded machine."""
    t0 = time.time()
    bad = 0
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i in range(start, start + n):
            c, errors = check(i, seed, wide)
            if errors:
                bad += 1
                print(f"MISMATCH index={i} seed={seed} {c}", file=out)
                for e in errors:
                    print(f"    {e}", file=out)
    finally:
        torch.set_num_threads(prev)
    print(f"fuzz: {n} {'wide ' if wide else ''}configurations (seed {seed}, from {start}), "
          f"{bad} mismatches, "
          f"{time.time() - t0:.1f} s", file=out)
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wide", action="store_true",
                    help="sizes that take the fused path's panels, tails and blocks (SIZES)")
    args = ap.parse_args()
    sys.exit(1 if run(args.n, args.seed, args.start, args.threads, wide=args.wide) else 0)


if __name__ == "__main__":
    main()
