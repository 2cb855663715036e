"""Shared test inputs and tolerance rules."""
import torch
from torch.nn.utils.rnn import pack_padded_sequence

# Small odd sizes (STYLE.md): nothing lines up with a vector width.
T, B, I, H, P = 4, 3, 17, 5, 3
LENGTHS = [4, 3, 3, 1]  # packed batch: batch_sizes = [4, 3, 3, 1]


def batch_sizes_for(lengths):
    """PackedSequence batch_sizes for lengths sorted in decreasing order (torch's own)."""
    return pack_padded_sequence(torch.zeros(max(lengths), len(lengths)), lengths).batch_sizes


def rel_err(actual, expected):
    """max |a - e| / max |e|, in float64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def layer_inputs(kind, packed, device, dtype, proj=False, bias=True, requires_grad=False,
                 lengths=LENGTHS, T=T, B=B, H=H, P=P):
    """Random inputs of one op call: dict with x_proj, h0, (c0), w_hh, (w_hr), b_hh, batch_sizes."""
    G = 4 if kind == "lstm" else 3
    Hout = P if proj else H
    opts = dict(device=device, dtype=dtype)
    if packed:
        bs = batch_sizes_for(lengths)
        rows, Bs = int(bs.sum()), int(bs[0])
        x_proj = torch.randn(rows, G * H, **opts)
    else:
        bs, Bs = None, B
        x_proj = torch.randn(T, B, G * H, **opts)
    d = dict(x_proj=x_proj, h0=torch.randn(Bs, Hout, **opts))
    if kind == "lstm":
        d["c0"] = torch.randn(Bs, H, **opts)
    d["w_hh"] = torch.randn(G * H, Hout, **opts) / H ** 0.5
    if kind == "lstm":
        d["w_hr"] = torch.randn(Hout, H, **opts) / H ** 0.5 if proj else None
    d["b_hh"] = torch.randn(G * H, **opts) if bias else None
    if requires_grad:
        for k, v in d.items():
            if v is not None:
                v.requires_grad_(True)
    d["batch_sizes"] = bs
    return d


def grad_tensors(d):
    """The tensors of a layer_inputs dict that require grad, by name."""
    return {k: v for k, v in d.items() if isinstance(v, torch.Tensor) and v.requires_grad}
