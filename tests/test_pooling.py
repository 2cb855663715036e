"""fusedrnn.pooling against a loop over the unpadded sequences, in float64, gradients included."""

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import pooling

T, B, F = 7, 5, 6
LENGTHS = [4, 7, 1, 6, 3]  # unsorted, with a length-1 and a full-length sequence
TOL = {"rtol": 1e-12, "atol": 1e-12}
GARBAGE = (float("nan"), float("inf"), float("-inf"), 1e30, -1e30)


def _batch(seed, batch_first):
    """Time-major valid data with garbage at every padded step; returns the layout asked for."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, F, generator=gen, dtype=torch.float64)
    for b, length in enumerate(LENGTHS):
        for t in range(length, T):
            x[t, b] = GARBAGE[(t + b) % len(GARBAGE)]
    x = x.transpose(0, 1).contiguous() if batch_first else x
    return x.requires_grad_()


def _sequences(x, batch_first):
    """The valid steps of each sequence, ``(L_b, F)`` views into ``x``."""
    x_tm = x.transpose(0, 1) if batch_first else x
    return [x_tm[:length, b] for b, length in enumerate(LENGTHS)]


def _loop(fn, x, batch_first):
    return torch.stack([fn(seq) for seq in _sequences(x, batch_first)])


def _check_against_loop(pool, per_seq, x, batch_first, extra_params=()):
    """Forward and gradients (w.r.t. x and ``extra_params``) of ``pool(x)`` equal the loop's."""
    weights = torch.randn(B, F, dtype=torch.float64)
    out = pool(x)
    assert out.shape == (B, F)
    grads = torch.autograd.grad((out * weights).sum(), [x, *extra_params])
    expected = _loop(per_seq, x, batch_first)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [x, *extra_params])
    torch.testing.assert_close(out, expected, **TOL)
    for got, want in zip(grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL)
    # The loop never touches padded steps, so their gradient must be exactly 0.
    mask = torch.zeros(T, B, dtype=torch.bool)
    for b, length in enumerate(LENGTHS):
        mask[:length, b] = True
    mask = mask.T if batch_first else mask
    assert (grads[0][~mask] == 0).all()


def _max(seq):
    return seq.max(0).values


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", ["mean", "max"])
def test_functional_matches_loop(name, batch_first):
    x = _batch(1, batch_first)
    fn, per_seq = {
        "mean": (pooling.mean_pool, lambda s: s.mean(0)),
        "max": (pooling.max_pool, _max),
    }[name]
    _check_against_loop(
        lambda x: fn(x, torch.tensor(LENGTHS), batch_first), per_seq, x, batch_first
    )
    # lengths given as a list of ints works the same
    torch.testing.assert_close(
        fn(x, LENGTHS, batch_first), fn(x, torch.tensor(LENGTHS), batch_first), rtol=0, atol=0
    )


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cls", [pooling.MeanPool, pooling.MaxPool])
def test_modules_match_loop(cls, batch_first):
    x = _batch(2, batch_first)
    per_seq = (lambda s: s.mean(0)) if cls is pooling.MeanPool else _max
    _check_against_loop(lambda x: cls(batch_first=batch_first)(x, LENGTHS), per_seq, x, batch_first)


@pytest.mark.parametrize("hidden_size", [None, 3])
@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_matches_loop(batch_first, hidden_size):
    torch.manual_seed(3)
    pool = pooling.AttentionPool(F, hidden_size, batch_first=batch_first, dtype=torch.float64)
    x = _batch(4, batch_first)

    def per_seq(seq):
        return torch.softmax(pool.score(seq).squeeze(-1), 0) @ seq

    params = list(pool.parameters())
    _check_against_loop(lambda x: pool(x, LENGTHS), per_seq, x, batch_first, params)

    out, weights = pool(x, LENGTHS, return_weights=True)
    torch.testing.assert_close(out, pool(x, LENGTHS), rtol=0, atol=0)
    assert weights.shape == (B, T)
    for b, length in enumerate(LENGTHS):
        torch.testing.assert_close(
            weights[b, :length],
            torch.softmax(pool.score(_sequences(x, batch_first)[b]).squeeze(-1), 0),
            **TOL
        )
        assert (weights[b, length:] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(B, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_matches_loop(enforce_sorted):
    """A PackedSequence gives the same result as the loop, in the original batch order."""
    torch.manual_seed(5)
    x = _batch(6, batch_first=False)
    order = sorted(range(B), key=lambda b: -LENGTHS[b]) if enforce_sorted else list(range(B))
    attention = pooling.AttentionPool(F, 4, dtype=torch.float64)

    def packed(fn):
        # Sorted packing needs the batch sorted by length; undo that order on the way out.
        pack = pack_padded_sequence(
            x[:, order], [LENGTHS[b] for b in order], enforce_sorted=enforce_sorted
        )
        return fn(pack)[torch.tensor(order).argsort()]

    cases = [
        (pooling.mean_pool, lambda s: s.mean(0), ()),
        (pooling.max_pool, _max, ()),
        (pooling.MeanPool(), lambda s: s.mean(0), ()),
        (pooling.MaxPool(), _max, ()),
        (
            attention,
            lambda s: torch.softmax(attention.score(s).squeeze(-1), 0) @ s,
            list(attention.parameters()),
        ),
    ]
    for fn, per_seq, params in cases:
        _check_against_loop(lambda x: packed(fn), per_seq, x, False, params)


def test_padding_content_does_not_matter():
    """Two batches that differ only at padded steps pool to exactly the same values."""
    torch.manual_seed(7)
    x = _batch(8, batch_first=True).detach()
    other = torch.randn_like(x) * 1e6
    for b, length in enumerate(LENGTHS):
        other[b, :length] = x[b, :length]
    attention = pooling.AttentionPool(F, 4, batch_first=True, dtype=torch.float64)
    for fn in (pooling.MeanPool(True), pooling.MaxPool(True), attention):
        a, b = fn(x, LENGTHS), fn(other, LENGTHS)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_lengths_means_full_sequences():
    x = torch.randn(T, B, F, dtype=torch.float64)
    torch.testing.assert_close(pooling.mean_pool(x), x.mean(0), **TOL)
    torch.testing.assert_close(
        pooling.max_pool(x.transpose(0, 1), batch_first=True), x.amax(0), rtol=0, atol=0
    )


def test_bad_input_raises():
    x = torch.randn(T, B, F)
    pack = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    with pytest.raises(ValueError, match="PackedSequence"):
        pooling.mean_pool(pack, LENGTHS)
    with pytest.raises(ValueError, match="3-D"):
        pooling.max_pool(x[0], LENGTHS)
    with pytest.raises(ValueError, match=r"\[1, 7\]"):
        pooling.mean_pool(x, [4, 8, 1, 6, 3])
    with pytest.raises(ValueError, match=r"\[1, 7\]"):
        pooling.max_pool(x, [4, 0, 1, 6, 3])
    with pytest.raises(ValueError, match="one per sequence"):
        pooling.mean_pool(x, LENGTHS[:-1])
    with pytest.raises(ValueError, match="one per sequence"):
        pooling.mean_pool(x, torch.tensor(LENGTHS, dtype=torch.float32))


def test_pools_a_fusedrnn_packed_output():
    """End to end: pooling fusedrnn.LSTM's PackedSequence output equals pooling each sequence
    run on its own."""
    lstm = fusedrnn.LSTM(F, 4, dtype=torch.float64)
    x = _batch(9, batch_first=False).detach()
    out, _ = lstm(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))
    alone = [lstm(seq)[0] for seq in _sequences(x, False)]
    for fn, reduce in ((pooling.mean_pool, lambda o: o.mean(0)), (pooling.max_pool, _max)):
        torch.testing.assert_close(fn(out), torch.stack([reduce(o) for o in alone]), **TOL)


@pytest.mark.parametrize("make", [lambda: pooling.MeanPool(batch_first=True),
                                  lambda: pooling.MaxPool(batch_first=True),
                                  lambda: pooling.AttentionPool(F, hidden_size=4, batch_first=True)],
                         ids=["mean", "max", "attention"])
def test_export_and_compile_with_dynamic_sizes(make):
    """An LSTM and a pool over lengths, exported with the batch and length dynamic
    and compiled with dynamic shapes in one graph: the lengths are data there, so
    their check runs with the graph; results equal eager mode at other sizes, and
    a length out of range still raises."""
    from torch.export import Dim

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.pool = fusedrnn.LSTM(3, F, batch_first=True), make()

        def forward(self, x, lengths):
            return self.pool(self.rnn(x)[0], lengths)

    model = Model().double().eval()
    x, lengths = torch.randn(B, T, 3, dtype=torch.float64), torch.tensor(LENGTHS)
    batch = Dim("batch")
    with warnings.catch_warnings():  # RNNBase's _flat_weights, as torch.nn.LSTM's export notes
        warnings.filterwarnings("ignore", message="The tensor attributes self.rnn._flat_weights")
        program = torch.export.export(model, (x, lengths),
                                      dynamic_shapes=({0: batch, 1: Dim("steps")}, {0: batch}))
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    x2, lengths2 = torch.randn(3, 9, 3, dtype=torch.float64), torch.tensor([9, 2, 5])
    for run in (program.module(), compiled):
        for args in ((x, lengths), (x2, lengths2)):
            torch.testing.assert_close(run(*args), model(*args), rtol=1e-12, atol=1e-12)
        with pytest.raises(RuntimeError, match="every length must be in"):
            run(x2, torch.tensor([9, 0, 5]))
