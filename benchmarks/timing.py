"""Interleaved timing of competing step functions.

Each function is warmed up, then timed in rounds with
torch.utils.benchmark.Timer.blocked_autorange (which synchronises CUDA around
each block); the order of the functions alternates from one round to the next,
so drift of a shared machine (other jobs, clocks) hits all of them alike. The
statistic is the median over all blocks of all rounds; ratios are taken between
medians measured in this same process.
"""
import statistics

from torch.utils.benchmark import Timer

WARMUP_CALLS = 1  # on top of the parity run and blocked_autorange's own block-size warm-up


def _ms(seconds):
    return [1e3 * s for s in seconds]


def measure(fns, rounds, min_run_time, threads):
    """fns: {name: no-argument callable}. Returns {name: stats} with per-call
    times in ms: 'median_ms', 'iqr_ms', 'round_medians_ms', 'blocks',
    'calls_per_block'."""
    for fn in fns.values():
        for _ in range(WARMUP_CALLS):
            fn()
    timers = {k: Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
              for k, fn in fns.items()}
    names = list(fns)
    times = {k: [] for k in names}
    round_medians = {k: [] for k in names}
    calls = {k: 0 for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            m = timers[k].blocked_autorange(min_run_time=min_run_time)
            times[k] += m.times
            round_medians[k].append(1e3 * m.median)
            calls[k] = m.number_per_run
    out = {}
    for k in names:
        q1, _, q3 = statistics.quantiles(times[k], n=4) if len(times[k]) > 1 else [times[k][0]] * 3
        out[k] = {"median_ms": 1e3 * statistics.median(times[k]), "iqr_ms": 1e3 * (q3 - q1),
                  "round_medians_ms": round_medians[k], "blocks": len(times[k]),
                  "calls_per_block": calls[k], "block_ms": _ms(times[k])}
    return out


def ratio_range(num, den):
    """(min, max) over rounds of num/den per-round medians: how much the ratio
    moved while the benchmark ran."""
    rs = [a / b for a, b in zip(num["round_medians_ms"], den["round_medians_ms"])]
    return [min(rs), max(rs)]
