"""The benchmark tooling: what it records about the environment, the
--omp-passive re-execution, result files, RESULTS.md, and the GEMM
micro-benchmark's calls (each checked against float64)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import (bench, cases, cells, configs, environment, gemm, regularisers, report,
                        results_md)
from isa_helpers import RUNNABLE

REPO = Path(__file__).resolve().parent.parent

CPUINFO = """processor\t: 0
physical id\t: 0
core id\t: 0
model name\t: Some CPU
cpu MHz\t\t: 2600.000
flags\t\t: fpu sse avx2 fma avx512f avx512bw amx_tile amx_bf16

processor\t: 1
physical id\t: 0
core id\t: 0
model name\t: Some CPU
flags\t\t: fpu sse avx2 fma avx512f avx512bw amx_tile amx_bf16

processor\t: 2
physical id\t: 0
core id\t: 1
model name\t: Some CPU
flags\t\t: fpu sse avx2 fma avx512f avx512bw amx_tile amx_bf16
"""


def test_runtime_variables_picks_the_threading_and_math_ones():
    env = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0", "MKL_NUM_THREADS": "2",
           "GOMP_SPINCOUNT": "1", "ONEDNN_VERBOSE": "1", "HOME": "/x", "MY_OMP_X": "1"}
    got = environment.runtime_variables(env)
    assert got == {k: env[k] for k in ("GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS",
                                       "OMP_WAIT_POLICY", "ONEDNN_VERBOSE")}
    assert environment.variant(got) == "omp-passive"
    assert environment.variant({"OMP_WAIT_POLICY": "active"}) is None
    assert environment.variant({}) is None


def test_cpu_isa_and_cores_from_cpuinfo():
    isa = environment.cpu_isa(CPUINFO)
    assert isa["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isa["flags"] == {"avx2": True, "fma": True, "avx512f": True, "avx512vl": False,
                            "avx512dq": False, "avx512bw": True, "avx512_bf16": False,
                            "avx512_fp16": False, "amx_bf16": True, "amx_tile": True}
    cores = environment.cpu_cores(CPUINFO)
    assert cores["physical"] == 2
    assert cores["logical"] == os.cpu_count()


def _run_reexec(extra_env, flag, show="os.environ.get('OMP_WAIT_POLICY')"):
    code = ("import os, sys; from benchmarks import environment; "
            f"environment.reexec_if_asked({[flag] if flag else []!r}); "
            f"import torch; print({show})")
    env = {k: v for k, v in os.environ.items()
           if k != "OMP_WAIT_POLICY" and k not in environment.AVX2_CPU_VARIABLES}
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_omp_passive_reexecutes_before_torch_and_nothing_is_set_without_it():
    assert _run_reexec({}, None) == "None"
    assert _run_reexec({}, environment.OMP_PASSIVE_FLAG) == "PASSIVE"
    # The user's own setting is kept when the option is not given.
    assert _run_reexec({"OMP_WAIT_POLICY": "ACTIVE"}, None) == "ACTIVE"


def test_as_avx2_cpu_holds_torch_and_fusedrnn_to_avx2_before_torch_loads():
    """Note [an AVX2 CPU emulated]: the variables are in force when torch
    loads (ATen reports AVX2), and a recorded environment with them is labelled."""
    show = ("[os.environ.get(k) for k in sorted(environment.AVX2_CPU_VARIABLES)] + "
            "[torch.backends.cpu.get_cpu_capability()]")
    got = eval(_run_reexec({}, environment.AVX2_CPU_FLAG, show))
    want = [environment.AVX2_CPU_VARIABLES[k] for k in sorted(environment.AVX2_CPU_VARIABLES)]
    assert got[:-1] == want and got[-1] in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    assert eval(_run_reexec({}, None, show))[:-1] == [None] * len(want)
    emulated = _doc(variables={k: v for k, v in environment.AVX2_CPU_VARIABLES.items()})
    emulated["env"]["fusedrnn_cpu_path"] = {"isa": "avx2", "forced": True}
    forced = _doc(variables={"FUSEDRNN_CPU_ISA": "avx2"})
    forced["env"]["fusedrnn_cpu_path"] = {"isa": "avx2", "forced": True}
    assert environment.emulated_avx2_cpu(emulated["env"])
    assert not environment.emulated_avx2_cpu(forced["env"])
    assert environment.cpu_path_tag(emulated["env"]) == "-as-avx2"
    assert "an AVX2 CPU emulated" in environment.variant_title(emulated["env"])
    assert "forced" in environment.variant_title(forced["env"])


def test_no_benchmark_script_sets_an_openmp_variable():
    """Only environment.py sets one, and only for --omp-passive (tested above)."""
    shell = re.compile(r"^[^#]*\b(OMP|KMP|GOMP|MKL)_\w+=", re.M)
    python = re.compile(r"(environ\[|setdefault\(|putenv\()\s*[\"'](OMP|KMP|GOMP|MKL)_")
    for path in [REPO / "scripts" / "main.sh", *sorted((REPO / "benchmarks").glob("*.sh"))]:
        assert not shell.search(path.read_text()), f"{path.name} sets an OpenMP variable"
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        if path.name != "environment.py":
            assert not python.search(path.read_text()), f"{path.name} sets an OpenMP variable"


def _doc(kind="bench", set_name="quick", variables=None, complete=True, started="2026-01-01"):
    variables = variables or {}
    env = {"cpu_model": "Some CPU", "torch_threads": 2, "torch": "2.x", "cuda": None,
           "cudnn": None, "runtime_variables": variables,
           "variant": environment.variant(variables),
           "omp_passive_option": bool(variables), "cpu_isa": environment.cpu_isa(CPUINFO),
           "cpu_cores": {"logical": 3, "usable": 3, "physical": 2}, "fusedrnn_commit": "abc"}
    return {"kind": kind, "device": "cpu", "set": set_name, "argv": ["--" + set_name],
            "started": started + "T00:00:00", "complete": complete, "env": env, "rows": [],
            "notes": []}


def _write(folder, name, doc):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(doc))
    return folder / name


def test_result_paths_and_newest_results(tmp_path):
    stamp = "20260102-030405"
    assert report.result_path(tmp_path, "cpu", "quick", None, stamp).name == \
        f"cpu-quick-{stamp}.json"
    assert report.result_path(tmp_path, "gemm-cpu", "quick", "omp-passive", stamp).name == \
        f"gemm-cpu-quick-omp-passive-{stamp}.json"
    assert report.result_path(tmp_path, "cpu", "smoke", None, stamp).name == "smoke-cpu.json"

    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    old = _write(tmp_path, "cpu-quick-20260101-000000.json", _doc())
    new = _write(tmp_path, "cpu-quick-20260102-000000.json", _doc())
    _write(tmp_path, "cpu-quick-20260103-000000.json", _doc(complete=False))  # interrupted
    pas = _write(tmp_path, "cpu-quick-omp-passive-20260101-000000.json", _doc(variables=passive))
    full = _write(tmp_path / "full", "cpu-full-20260101-000000.json", _doc(set_name="full"))
    gem = _write(tmp_path, "gemm-cpu-quick-20260101-000000.json", _doc(kind="gemm"))
    _write(tmp_path, "smoke-cpu.json", _doc(set_name="smoke"))
    _write(tmp_path, "cpu-latest.json", _doc())
    got = report.newest_results(tmp_path)
    assert set(got) == {new, pas, full, gem}
    assert old not in got
    assert report.newest_results(tmp_path, kind="gemm") == [gem]


def test_newest_results_per_model_and_precision(tmp_path):
    """A newer run of one model (or precision) supersedes an older run's rows
    of that model only; the older file stays while it is the newest for any
    of its own."""
    def rows(*pairs):
        doc = _doc(set_name="full")
        doc["rows"] = [{"model": m, "precision": p} for m, p in pairs]
        return doc

    both = _write(tmp_path, "cpu-full-20260101-000000.json",
                  rows(("LSTM", "float32"), ("GRU", "float32")))
    lstm = _write(tmp_path, "cpu-full-20260102-000000.json", rows(("LSTM", "float32")))
    assert set(report.newest_results(tmp_path)) == {both, lstm}
    bf16 = _write(tmp_path, "cpu-full-20260103-000000.json", rows(("GRU", "bfloat16")))
    assert set(report.newest_results(tmp_path)) == {both, lstm, bf16}
    gru = _write(tmp_path, "cpu-full-20260104-000000.json", rows(("GRU", "float32")))
    assert set(report.newest_results(tmp_path)) == {lstm, bf16, gru}


def test_results_markdown_names_the_environment(tmp_path):
    default = _write(tmp_path, "cpu-quick-20260101-000000.json", _doc())
    passive = _write(tmp_path, "cpu-quick-omp-passive-20260101-000000.json",
                     _doc(variables={"OMP_WAIT_POLICY": "PASSIVE"}))
    text = results_md.render([passive, default], tmp_path / "RESULTS.md")
    first, second = text.split("\n## ")[1:3]
    assert "PASSIVE" not in first and "library defaults" in first
    assert "[OMP_WAIT_POLICY=PASSIVE]" in second.splitlines()[0]
    assert "OMP_WAIT_POLICY=PASSIVE (--omp-passive)" in second
    assert "avx512f" in first and "2 physical cores" in first
    assert str(tmp_path) not in text  # no machine paths


def test_verbose_lines_attribute_library_calls():
    text = "\n".join([
        "@@begin projection oneDNN",
        "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src,,1x1,1.0",
        "onednn_verbose,v1,primitive,exec,cpu,inner_product,brg_matmul:avx512_core,"
        "forward_inference,src,,mb1,1.0",
        "@@end", "@@begin projection MKL",
        "MKL_VERBOSE oneMKL 2024.0 Product build",
        "MKL_VERBOSE SGEMM(T,N,1,1,1) 1us", "@@end",
        "@@begin projection fusedrnn", "@@end"])
    got = gemm._verbose_lines(text)
    assert got[("projection", "oneDNN")] == {
        "onednn": ["inner_product:brg_matmul:avx512_core:forward_inference"], "mkl": []}
    assert got[("projection", "MKL")] == {"onednn": [], "mkl": ["SGEMM"]}
    assert got[("projection", "fusedrnn")] == {"onednn": [], "mkl": []}


@pytest.mark.parametrize("model", ["LSTM", "GRU"])
def test_gemm_calls_compute_the_products(model):
    """Every library's call of every product agrees with float64 (odd sizes)."""
    o = gemm.Operands(model, configs.Config(3, 2, 17, 5), seed=1)
    with torch.inference_mode():
        for prod in gemm.PRODUCTS:
            fns = gemm.calls(prod.key, o)
            assert set(fns) == set(gemm.LIBRARIES)
            res = gemm.check(prod.key, o, fns)
            assert all(r["passed"] for r in res.values()), (prod.key, res)
            M, K, N = gemm.mnk(prod.key, o.G, o.cfg)
            a, b = o.lhs_rhs(prod.key)
            assert (a.shape[0], a.shape[1], b.shape[1]) == (M, K, N)


def test_gemm_check_catches_a_wrong_product():
    o = gemm.Operands("LSTM", configs.Config(3, 2, 17, 5), seed=1)
    fns = gemm.calls("projection", o)
    fns["oneDNN"] = lambda: torch.mm(o.x, o.w_ih.t()) * (1 + 1e-3)
    res = gemm.check("projection", o, fns)
    assert res["MKL"]["passed"] and res["fusedrnn"]["passed"] and not res["oneDNN"]["passed"]


def test_gemm_run_writes_a_labelled_result_and_markdown(tmp_path):
    """A tiny run end to end, backend check included: the JSON holds the
    environment and the check, fractions are of a bound no rate exceeds, and
    RESULTS.md renders it."""
    argv = ["--config", "3,2,17,5", "--models", "GRU", "--rounds", "1", "--min-run-time",
            "0.001", "--out-dir", str(tmp_path)]
    assert gemm.main(argv) == 0
    (path,) = tmp_path.glob("gemm-cpu*-custom-*.json")  # cpu-avx2-... under a forced path
    doc = json.loads(path.read_text())
    assert doc["kind"] == "gemm" and doc["complete"]
    assert doc["argv"] == argv[:-2]  # without the output directory
    assert doc["env"]["runtime_variables"] == environment.runtime_variables()
    assert doc["backend_check"]["ok"], doc["backend_check"]
    assert {r["product"] for r in doc["rows"]} == {p.key for p in gemm.PRODUCTS}
    for row in doc["rows"]:
        for r in row["results"].values():
            assert r["status"] == "ok" and 0 < r["fraction_of_peak"] <= 1
    assert report.newest_results(tmp_path) == [path]
    text = results_md.render([path], tmp_path / "RESULTS.md")
    assert "GEMM micro-benchmark: CPU, `custom` set" in text
    assert text.count("| GRU | 3,2,17,5 |") == len(gemm.PRODUCTS)


def test_regularisers_set_runs_and_renders(tmp_path):
    """--regularisers on a tiny config end to end: every row passes parity and is
    timed, and RESULTS.md renders it."""
    argv = ["--regularisers", "--config", "3,2,5,4", "--rounds", "1", "--min-run-time", "0.001",
            "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("regularisers-cpu-custom-*.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "regularisers" and doc["complete"]
    assert doc["argv"] == argv[:-2]  # the command as run, without the output directory
    assert len(doc["rows"]) == 2 * len(regularisers.VARIANTS) * 2
    for row in doc["rows"]:
        assert row["status"] == "ok" and row["parity"]["passed"], row
        assert row["cost"] > 0 and (row.get("loop_ms") is not None) == \
            (row["variant"] in regularisers.LOOP_TIMED)
    text = results_md.render([path], tmp_path / "RESULTS.md")
    assert "fusedrnn's regularisers: CPU, `custom` set" in text
    assert text.count("| LSTM | layer_norm |") == 2


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_regularisers_parity_catches_a_wrong_model(mode):
    case = regularisers.RegCase("LSTM", "layer_norm", configs.Config(3, 2, 5, 4), seed=0)
    assert case.parity(mode)["passed"]
    with torch.no_grad():
        case.reg.layernorm_hh_weight_l0.mul_(1 + 1e-3)
    assert not case.parity(mode)["passed"]


@pytest.mark.parametrize("model", ["LSTM", "GRU"])
def test_packed_rows_run_packed_input_and_parity_sees_a_wrong_weight(model):
    """A config tagged "packed" (the --packed set) runs PackedSequence input of
    lengths T/2..T on both sides; parity passes, and fails for a weight off by 1e-3."""
    assert bench.parse_args(["--packed"]).set == "packed"
    assert all("packed" in c.tags for c in configs.config_set("packed"))
    cfg = configs.Config(6, 4, 5, 8, ("packed",))
    case = cases.Case(model, cfg, configs.PRECISIONS["float32"], "cpu", seed=0)
    assert int(case.lengths.max()) == 6 and int(case.lengths.min()) >= 3
    oracle = case.oracle("training")
    assert oracle["output"].shape == (int(case.lengths.sum()), 8)
    for mode in ("inference", "training"):
        assert case.parity(mode, oracle)["passed"]
        for which in ("torch", "fused"):
            case.step(which, mode)()
    assert bench.reference_plan("cpu", cfg, bench.parse_args(["--packed"])) is False
    with torch.no_grad():
        case.fused_mod.weight_hh_l0.mul_(1 + 1e-3)
    assert not case.parity("training", oracle)["passed"]


def test_cells_set_runs_and_renders(tmp_path):
    """--cells on a tiny size end to end: both cells and both layers on one
    step, both modes, parity passed and timed, and RESULTS.md renders it."""
    argv = ["--cells", "--config", "1,3,5,4", "--rounds", "1", "--min-run-time", "0.001",
            "--out-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    (path,) = tmp_path.glob("cells-cpu-custom-*.json")
    doc = json.loads(path.read_text())
    assert doc["kind"] == "cells" and doc["complete"]
    assert [(r["model"], r["mode"]) for r in doc["rows"]] == [
        (m, mode) for m in ("LSTMCell", "LSTM", "GRUCell", "GRU")
        for mode in ("inference", "training")]
    for row in doc["rows"]:
        assert row["status"] == "ok" and row["parity"]["passed"], row
        assert row["speedup"] == pytest.approx(row["torch_ms"] / row["fused_ms"])
    text = results_md.render([path], tmp_path / "RESULTS.md")
    assert "fusedrnn's cells and one-step layers against torch.nn's: CPU, `custom` set" in text
    assert text.count("| LSTMCell | B=3 I=5 H=4 |") == 2 and text.count("| GRU | B=3 I=5 H=4 |") == 2


@pytest.mark.parametrize("model", ["LSTMCell", "GRUCell", "LSTM", "GRU"])
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_cells_parity_catches_a_wrong_cell(model, mode):
    """The oracle sees a weight off by 1e-3 relative (in the state in inference,
    in a gradient in training too)."""
    case = cells.CellCase(model, configs.Config(1, 3, 5, 4), seed=0)
    assert case.parity(mode)["passed"]
    with torch.no_grad():
        getattr(case.fused_mod, "weight_hh" if model.endswith("Cell") else "weight_hh_l0").mul_(
            1 + 1e-3)
    assert not case.parity(mode)["passed"]


def test_the_cpu_path_is_recorded_and_kept_apart(tmp_path, monkeypatch):
    """The path fusedrnn's CPU ops take, and whether FUSEDRNN_CPU_ISA (or the
    older FUSEDRNN_CPU_PATH) forced it: in the environment, its text, the
    result file names, and newest_results, which keeps forced runs apart."""
    for knob in environment.CPU_PATH_KNOBS:
        monkeypatch.delenv(knob, raising=False)
    default = environment.fusedrnn_cpu_path()
    assert default["isa"] in ("amx", "avx512", "avx2", "generic") and not default["forced"]
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "generic")
    assert environment.fusedrnn_cpu_path() == {"isa": "generic", "forced": True}
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "auto")
    monkeypatch.setenv("FUSEDRNN_CPU_PATH", "generic")
    assert environment.fusedrnn_cpu_path() == {"isa": "generic", "forced": True}

    forced = _doc(variables={"FUSEDRNN_CPU_ISA": "avx2"})
    forced["env"]["fusedrnn_cpu_path"] = {"isa": "avx2", "forced": True}
    plain = _doc()
    plain["env"]["fusedrnn_cpu_path"] = {"isa": "avx512", "forced": False}
    assert environment.isa_text(forced["env"]).endswith(
        "fusedrnn CPU path avx2 (forced: FUSEDRNN_CPU_ISA=avx2)")
    assert environment.isa_text(plain["env"]).endswith("fusedrnn CPU path avx512")
    assert environment.cpu_path_tag(forced["env"]) == "-avx2"
    assert environment.cpu_path_tag(plain["env"]) == environment.cpu_path_tag(_doc()["env"]) == ""
    a = _write(tmp_path, "cpu-quick-20260101-000000.json", plain)
    b = _write(tmp_path, "cpu-avx2-quick-20260102-000000.json", forced)
    assert set(report.newest_results(tmp_path)) == {a, b}


@pytest.mark.skipif("avx2" not in RUNNABLE, reason="no AVX2 path on this CPU or build")
def test_gemm_runs_the_avx2_kernels_on_request(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", "auto")  # restored after main() sets it
    argv = ["--config", "3,2,17,5", "--models", "LSTM", "--rounds", "1", "--min-run-time",
            "0.001", "--no-backend-check", "--isa", "avx2", "--out-dir", str(tmp_path)]
    assert gemm.main(argv) == 0
    (path,) = tmp_path.glob("gemm-cpu-avx2-custom-*.json")
    doc = json.loads(path.read_text())
    assert doc["env"]["fusedrnn_cpu_path"] == {"isa": "avx2", "forced": True}
    assert doc["fusedrnn_gemm"] and all(
        r["status"] == "ok" for row in doc["rows"] for r in row["results"].values())
    assert ("fusedrnn: its avx2 GEMM and gate kernels (forced by FUSEDRNN_CPU_ISA)"
            in gemm.notes(doc))


# ---------------------------------------------------------------- benchmarks.flashrnn
def _flashrnn_layout_lstm(Wx, R, b):
    """FlashRNN's LSTM on its operands, written from its documented layout:
    pre-activations Wx[:, t] + R h_{t-1} + b, R[g, 0, u, k] weighting h[k] into
    gate g of unit u; gates i, f, z, o; output h as [T, B, H]."""
    B_, T_, _, _, H_ = Wx.shape
    h = Wx.new_zeros(B_, H_)
    c = Wx.new_zeros(B_, H_)
    outs = []
    for t in range(T_):
        pre = Wx[:, t, :, 0, :] + torch.einsum("guk,bk->bgu", R[:, 0], h) + b[:, 0]
        i, f, z, o = pre.unbind(1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(z)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs)


def test_flashrnn_operands_are_torch_weights_in_flashrnn_layout():
    from benchmarks import flashrnn as fr
    from fusedrnn import reference
    g = torch.Generator().manual_seed(5)
    T_, B_, H_ = 6, 3, 8
    x_proj = torch.randn(T_, B_, 4 * H_, generator=g, dtype=torch.float64)
    w_hh = torch.randn(4 * H_, H_, generator=g, dtype=torch.float64) / H_ ** 0.5
    b_hh = torch.randn(4 * H_, generator=g, dtype=torch.float64)
    zeros = torch.zeros(B_, H_, dtype=torch.float64)
    want = reference.lstm_layer(x_proj, zeros, zeros, w_hh, None, b_hh)[0]
    got = _flashrnn_layout_lstm(*fr.flashrnn_operands(x_proj, w_hh, b_hh))
    assert (got - want).abs().max() < 1e-12
    # The states output [S, B, T, 1, H] back to [T, B, H].
    states = torch.stack([got.transpose(0, 1), -got.transpose(0, 1)])[:, :, :, None, :]
    assert torch.equal(fr.flashrnn_output(states), got)
    flash = fr.load_flashrnn()
    if flash is not None:  # FlashRNN's own pure-torch backend, where it is installed
        h, _ = flash(*fr.flashrnn_operands(x_proj.float(), w_hh.float(), b_hh.float()),
                     function="lstm", backend="vanilla", dtype="float32")
        assert (fr.flashrnn_output(h).double() - want).abs().max() < 1e-5


def test_flashrnn_benchmark_without_gpu_runs_nothing(capsys, tmp_path):
    from benchmarks import flashrnn as fr
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the benchmark would run")
    assert fr.main(["--out-dir", str(tmp_path)]) == 0
    assert "no GPU visible" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_shown_command_leaves_out_the_output_directory():
    argv = ["--quick", "--out-dir", "res", "--rounds", "3", "--out-dir=other"]
    assert report.shown_argv(argv) == ["--quick", "--rounds", "3"]


H100 = (9, 0, 132)  # (major, minor, SMs) as configs.cudnn_algo takes a GPU


def test_cudnn_persistent_set_is_where_cudnn_persists():
    """Every row of the cudnn-persistent set is one where torch.nn.LSTM runs
    cuDNN's persistent kernel on an H100/H200, forward and backward; the same
    sizes as a GRU, in float32 or bfloat16, or on an sm_86 GPU run its
    standard algorithm, as do a batch that is no multiple of 8, H over 1024
    and I no multiple of 128; at small H, its small-H kernel."""
    cfgs = configs.config_set("cudnn-persistent")
    assert sorted((c.B, c.H) for c in cfgs) == sorted(
        (B, H) for B in (8, 16) for H in (256, 512, 768, 1024))
    for c in cfgs:
        for forward in (True, False):
            assert configs.cudnn_algo("LSTM", c, torch.float16, forward, H100) == "persistent"
            assert configs.cudnn_algo("GRU", c, torch.float16, forward, H100) == "standard"
            for dtype in (torch.float32, torch.bfloat16):
                assert configs.cudnn_algo("LSTM", c, dtype, forward, H100) == "standard"
            assert configs.cudnn_algo("LSTM", c, torch.float16, forward, (8, 6, 84)) == "standard"
    for T, B, I, H in [(100, 12, 512, 512), (100, 16, 1152, 1152), (100, 16, 300, 512)]:
        c = configs.Config(T, B, I, H)
        assert configs.cudnn_algo("LSTM", c, torch.float16, True, H100) == "standard", c
    small = configs.Config(100, 16, 160, 160)
    assert configs.cudnn_algo("GRU", small, torch.float32, True, H100) == "persistent-small-h"
    assert configs.cudnn_algo("GRU", small, torch.float32, False, H100) == "standard"
    assert configs.cudnn_algo("LSTM", small, torch.float64, True, H100) == "standard"


def test_cudnn_persistent_set_defaults_and_device(monkeypatch):
    """The set runs float16 LSTM rows unless --models/--dtype say otherwise,
    and on CUDA only: without a GPU, or with --device cpu, it stops with a
    message instead of running other rows."""
    args = bench.parse_args(["--cudnn-persistent"])
    assert (args.set, args.models) == ("cudnn-persistent", ["LSTM"])
    assert [p.name for p in bench.precisions("cuda", args, [])] == ["float16"]
    args = bench.parse_args(["--cudnn-persistent", "--models", "GRU", "--dtype", "bfloat16"])
    assert args.models == ["GRU"]
    assert [p.name for p in bench.precisions("cuda", args, [])] == ["bfloat16"]
    args = bench.parse_args(["--persistent"])
    assert args.models == ["LSTM", "GRU"]
    assert [p.name for p in bench.precisions("cuda", args, [])] == ["float32", "tf32", "bfloat16"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no GPU is visible"):
        bench.devices("all", "cudnn-persistent")
    assert bench.devices("all", "quick") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.devices("all", "cudnn-persistent") == ["cuda"]
    with pytest.raises(SystemExit, match="--device cpu"):
        bench.devices("cpu", "cudnn-persistent")


def test_cuda_rows_record_the_cudnn_algorithm(monkeypatch):
    """Each CUDA row names the cuDNN algorithm torch.nn runs there, per pass,
    on the GPU at hand (here a stand-in H100's properties)."""
    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    cfg = configs.config_set("cudnn-persistent")[0]
    assert bench.cudnn_algos("LSTM", cfg, torch.float16, "training") == {
        "forward": "persistent", "backward": "persistent"}
    assert bench.cudnn_algos("GRU", cfg, torch.float16, "inference") == {"forward": "standard"}


def test_gpu_check_stage_timeouts_add_up_to_its_header():
    """gpu_check.sh states the sum of its stages' timeouts (its GPU time
    budget; FlashRNN's stage, run only where its wheel was carried in, apart);
    a stage added or resized changes the sum, and the header with it."""
    text = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    stated = int(re.search(r"own timeouts \((\d+) s in all\)", text).group(1))
    timeouts = [int(t) for t in re.findall(r'^  stage "[^"]+" (\d+) ', text, re.M)]
    assert len(timeouts) >= 7
    assert sum(timeouts) == stated, timeouts
