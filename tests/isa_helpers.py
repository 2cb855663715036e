"""The CPU paths a test can force: FUSEDRNN_CPU_ISA=amx|avx512|avx2|generic
(Note [choosing the CPU path] in csrc/cpu/cpu_isa.h). The knob is read on every
op call, so monkeypatch.setenv switches paths between calls. amx differs from
avx512 only in bfloat16, so float tests run CPU_ISAS and bfloat16 ones
BF16_ISAS."""
import os

import pytest
import torch

import fusedrnn  # noqa: F401 (registers torch.ops.fusedrnn)

CPU_ISAS = ("avx512", "avx2", "generic")
BF16_ISAS = ("amx",) + CPU_ISAS  # every path, widest first
KNOBS = ("FUSEDRNN_CPU_ISA", "FUSEDRNN_CPU_PATH")


def cpu_isa_in_force():
    """The path the CPU ops take now: 'amx', 'avx512', 'avx2' or 'generic'."""
    return torch.ops.fusedrnn._cpu_isa()


def cpu_isa_runs(isa):
    """Whether this CPU and this build run the path FUSEDRNN_CPU_ISA=isa forces."""
    saved = {k: os.environ.pop(k, None) for k in KNOBS}
    os.environ["FUSEDRNN_CPU_ISA"] = isa
    try:
        return cpu_isa_in_force() == isa
    except RuntimeError:  # the CPU or the build lacks it
        return False
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


RUNNABLE = [isa for isa in BF16_ISAS if cpu_isa_runs(isa)]
FUSED_ISAS = [isa for isa in RUNNABLE if isa in CPU_ISAS and isa != "generic"]  # float paths


def isa_params(isas=CPU_ISAS):
    """pytest params of each path, skipped where this machine cannot run it."""
    return [pytest.param(isa, marks=pytest.mark.skipif(
        isa not in RUNNABLE, reason=f"this CPU or build has no {isa} path")) for isa in isas]


def force_cpu_isa(monkeypatch, isa):
    """Force the CPU path for the rest of the test (the old knob removed)."""
    monkeypatch.delenv("FUSEDRNN_CPU_PATH", raising=False)
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", isa)
    assert cpu_isa_in_force() == isa
