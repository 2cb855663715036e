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


def config_set(name):
    """'smoke', 'quick', 'persistent' or 'full' -> list of Config."""
    return {"smoke": lambda: _pick(SMOKE_KEYS), "quick": lambda: _pick(QUICK_KEYS),
            "persistent": _persistent_set, "full": full_set}[name]()


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
