"""A slice of the differential fuzzing against torch.nn (tests/fuzz.py; the long
form: python -m tests.fuzz --n 10000)."""
import io
import warnings

import fuzz


def test_fuzz_slice_matches_torch_nn():
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn's own notes (e.g. oneDNN and proj_size)
        bad = fuzz.run(300, seed=1, out=out)
    assert bad == 0, out.getvalue()


def test_fuzz_slice_at_wide_sizes_matches_torch_nn():
    """Sizes where the fused path runs several panels, tails and blocks of depth
    (fuzz.SIZES), on two threads so that the work is split between them."""
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = fuzz.run(40, seed=2, threads=2, out=out, wide=True)
    assert bad == 0, out.getvalue()
