"""What one layer and direction needs for the regularisers beyond torch.nn:
layer normalisation (Ba, Kiros and Hinton, 2016), zoneout (Krueger et al.,
2017) and recurrent dropout (Gal and Ghahramani, 2016).

A `LayerReg` carries the masks and gains of one op call. Masks are drawn by the
caller (fusedrnn.functional) from torch's generator, so `torch.manual_seed`
reproduces a run; the ops and the reference only apply them:

    rec_mask [B, P]   multiplies h_{t-1} where it enters W_hh, the same at every
                      step: (rec_mask * h_{t-1}) W_hh^T. Already scaled by 1/(1-p).
    zone_h            the weight of h_{t-1} in h_t, with x_proj's leading shape
                      ([T, B, P], or packed [N, P]): h_t = d h_{t-1} + (1 - d) h~_t.
                      0 or 1 in training; p everywhere in eval (the expectation).
    zone_c            the same for an LSTM's cell state ([T, B, H] or [N, H]).
    ln_hh [G*H]       layer_norm's gain of the recurrent pre-activation:
                      a_t gets LN_GH(h_{t-1} W_hh^T) * ln_hh (then + b_hh).
    ln_c_w, ln_c_b [H]  an LSTM's cell norm: h~_t = o tanh(LN_H(c_t) * ln_c_w + ln_c_b).
    ln_ih [G*H]       layer_norm's gain of the input side: x_proj is then x W_ih^T
                      (no bias) and the gates get LN_GH(x_proj) * ln_ih + b_ih.
    b_ih [G*H]        that side's bias (only with ln_ih; without it, b_ih is in x_proj).

LN_n is F.layer_norm over the last n values without affine, eps LN_EPS. Both
norms of a step's pre-activations are computed inside the recurrence, where the
step's rows are in cache. h~_t is computed from the cell state before its
zoneout. Absent fields are None; a LayerReg with none set is the plain layer.
"""
from typing import NamedTuple, Optional

from torch import Tensor

LN_EPS = 1e-5


class LayerReg(NamedTuple):
    rec_mask: Optional[Tensor] = None
    zone_h: Optional[Tensor] = None
    zone_c: Optional[Tensor] = None
    ln_hh: Optional[Tensor] = None
    ln_c_w: Optional[Tensor] = None
    ln_c_b: Optional[Tensor] = None
    ln_ih: Optional[Tensor] = None
    b_ih: Optional[Tensor] = None


def active(reg):
    """Whether `reg` (a LayerReg or None) asks for anything beyond the plain layer."""
    return reg is not None and any(f is not None for f in reg)
