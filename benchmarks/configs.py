"""Benchmark configurations (the fastrnns, small-batch and DeepBench-style sets), the sets built from them,
and the precisions each device runs."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Config:
    """One problem size: T time steps, batch B, input size I, hidden size H."""
    T: int
    B: int
    I: int  # noqa: E741 (torch's name)
    H: int
    tags: tuple = ()

    @property
    def key(self):
        return (self.T, self.B, self.I, self.H)

    @property
    def name(self):
        return f"T={self.T} B={self.B} I={self.I} H={self.H}"

    @property
    def short(self):
        """Compact label for plot axes."""
        return f"T{self.T} B{self.B} H{self.H}" if self.I == self.H else \
            f"T{self.T} B{self.B} I{self.I} H{self.H}"

    def as_dict(self):
        return {"T": self.T, "B": self.B, "I": self.I, "H": self.H, "tags": list(self.tags)}


def _square(T, B, H, tag):
    return Config(T, B, H, H, (tag,))


FASTRNNS = [_square(100, 64, 512, "fastrnns")]
SMALL_BATCH = [_square(100, B, H, "small-batch") for H in (256, 512, 1024) for B in (1, 8, 16)]
DEEPBENCH = [_square(T, B, H, "deepbench")
             for H in (512, 1024, 2048) for B in (16, 32, 64, 128) for T in (25, 50, 100)]

# A representative subset that runs in a few minutes on 2 CPU cores: the
# fastrnns default, batch 1, a small batch, and a short wide DeepBench row.
QUICK_KEYS = [(100, 64, 512, 512), (100, 1, 256, 256), (100, 16, 512, 512), (25, 64, 1024, 1024)]
# Where the persistent CUDA kernel is meant to win: T=100,
# B in {1, 8, 16, 64}, H in {256, 512, 1024}.
PERSISTENT_KEYS = [(100, B, H, H) for H in (256, 512, 1024) for B in (1, 8, 16, 64)]
# The smallest quick configs: proves the harness runs and parity holds.
SMOKE_KEYS = [(100, 1, 256, 256), (100, 16, 512, 512)]
# Where torch.nn.LSTM runs cuDNN's persistent kernel on an H100/H200
# (cudnn_algo below): float16, B in {8, 16}, H in {256, 512, 768, 1024}.
# cuDNN at its best: the GPU set's other rows all run its step-wise algorithm.
CUDNN_PERSISTENT_KEYS = [(100, B, H, H) for H in (256, 512, 768, 1024) for B in (8, 16)]
# PackedSequence input (cases.Case packs a config tagged "packed": lengths
# drawn from T/2 to T, unsorted): a small and a fastrnns-sized batch.
PACKED_KEYS = [(100, 16, 256, 256), (100, 64, 512, 512)]
# What a set runs unless --models and --dtype say otherwise (else both models,
# DEFAULT_PRECISIONS).
SET_MODELS = {"cudnn-persistent": ["LSTM"]}
SET_PRECISIONS = {"cudnn-persistent": {"cuda": ["float16"]}}
# Sets that run on CUDA only.
CUDA_ONLY_SETS = {"cudnn-persistent"}


def cudnn_algo(model, cfg, dtype, forward, gpu):
    """The cuDNN algorithm torch.nn runs for one padded, one-layer,
    one-direction layer without projection: "persistent-small-h",
    "persistent" or "standard". gpu: (major, minor, SM count). Follows
    torch's get_algo (aten/src/ATen/native/cudnn/RNN.cpp, cuDNN >= 8.2.1):
    the small-H persistent kernel for any dtype but float64 at H <= 192
    forward (128 backward) for LSTM and GRU; the persistent kernel for a
    float16 LSTM with H <= 1024, H and I multiples of 128, and, on sm_80+
    GPUs with 98 SMs or more other than sm_86, B a multiple of 8 up to 128
    (torch never takes it for the GRU there)."""
    major, minor, sms = gpu
    if dtype != torch.float64 and cfg.H <= (192 if forward else 128):
        return "persistent-small-h"
    if dtype != torch.float16 or model != "LSTM":
        return "standard"
    if cfg.H > 1024 or cfg.H % 128 or cfg.I % 128:
        return "standard"
    if major >= 8 and sms >= 98 and minor != 6:
        return "persistent" if cfg.B % 8 == 0 and cfg.B <= 128 else "standard"
    if major == 7 and minor != 5:  # V100
        B, T = cfg.B, cfg.T
        size_ok = (B % 16 == 0 and B not in (80, 112)) or B == 8
        steps_ok = (T >= 40 and B <= 128) or (T >= 20 and B <= 96) or (T >= 10 and B <= 32)
        return "persistent" if size_ok and steps_ok else "standard"
    return "standard"


def _persistent_set():
    by_key = {c.key: c for c in full_set()}
    return [by_key.get(k) or Config(*k, ("persistent",)) for k in PERSISTENT_KEYS]


def full_set():
    """Every config of the three families once; a config in several families
    (fastrnns is also a DeepBench point) keeps all its tags."""
    merged = {}
    for cfg in FASTRNNS + SMALL_BATCH + DEEPBENCH:
        old = merged.get(cfg.key)
        merged[cfg.key] = cfg if old is None else Config(*cfg.key, old.tags + cfg.tags)
    return list(merged.values())


def _pick(keys):
    by_key = {c.key: c for c in full_set()}
    return [by_key[k] for k in keys]


def _cudnn_persistent_set():
    return [Config(*k, ("cudnn-persistent",)) for k in CUDNN_PERSISTENT_KEYS]


def config_set(name):
    """'smoke', 'quick', 'persistent', 'cudnn-persistent', 'packed' or 'full' -> list
    of Config."""
    return {"smoke": lambda: _pick(SMOKE_KEYS), "quick": lambda: _pick(QUICK_KEYS),
            "persistent": _persistent_set, "cudnn-persistent": _cudnn_persistent_set,
            "packed": lambda: [Config(*k, ("packed",)) for k in PACKED_KEYS],
            "full": full_set}[name]()


def parse_config(text):
    """'T,B,I,H' or 'TxBxIxH' -> Config (tagged 'custom')."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 4:
        raise ValueError(f"--config wants T,B,I,H, got {text!r}")
    return Config(*(int(p) for p in parts), ("custom",))


@dataclass(frozen=True)
class Precision:
    """A dtype, and for float32 on CUDA whether TF32 is allowed (for cuBLAS
    and cuDNN alike, so torch.nn and fusedrnn run at the same precision)."""
    name: str
    dtype: torch.dtype
    tf32: bool = False


PRECISIONS = {
    "float32": Precision("float32", torch.float32, tf32=False),
    "tf32": Precision("tf32", torch.float32, tf32=True),
    "bfloat16": Precision("bfloat16", torch.bfloat16),
    "float16": Precision("float16", torch.float16),
    "float64": Precision("float64", torch.float64),
}
DEFAULT_PRECISIONS = {"cpu": ["float32"], "cuda": ["float32", "tf32", "bfloat16"]}
CUDA_ONLY_PRECISIONS = {"tf32"}
