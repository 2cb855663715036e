"""benchmarks/gradflow.py, the experiment behind benchmarks/results/gradflow.png: its
adding problem, and the command's PNG and JSON."""

import json

import pytest
import torch

from benchmarks import gradflow

T, B, H = 12, 4, 6


def test_adding_problem():
    x, target = gradflow.adding_problem(64, 20, torch.Generator().manual_seed(0))
    assert x.shape == (20, 64, 2) and target.shape == (64,)
    values, markers = x.unbind(-1)
    assert ((values >= 0) & (values < 1)).all()
    assert set(markers.unique().tolist()) == {0.0, 1.0}
    assert (markers[:10].sum(0) == 1).all() and (markers[10:].sum(0) == 1).all()
    torch.testing.assert_close(target, (values * markers).sum(0))


@pytest.mark.parametrize(
    "classes,flags,expected",
    [(gradflow.TORCH_CLASSES, [], "torch.nn"), (None, ["--torch-nn"], "torch.nn"),
     (None, [], "fusedrnn")],
    ids=["override", "flag", "default"],
)
def test_command_writes_png_and_json(tmp_path, classes, flags, expected):
    png = tmp_path / "sub" / "flow.png"
    steps, threads = 3, torch.get_num_threads()
    argv = f"--steps {steps} --seq-len {T} --batch {B} --hidden {H} --threads {threads + 1}".split()
    gradflow.main(argv + flags + ["--out", str(png)], classes=classes)
    assert torch.get_num_threads() == threads
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(png.with_suffix(".json").read_text())
    assert list(results["runs"]) == [run[0] for run in gradflow.RUNS]
    for run in results["runs"].values():
        assert len(run["loss"]) == len(run["grad_norm"]) == steps
        for key in ("dx_init", "dh_init", "dx_final", "dh_final"):
            assert len(run[key]) == T
    assert results["runs"]["LSTM"]["class"].startswith(expected)
    assert results["runs"]["RNN"]["class"] == "torch.nn.modules.rnn.RNN"
