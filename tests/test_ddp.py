"""DistributedDataParallel over the modules: 2 processes, gloo, loopback only.
Gradients equal those of one process on the concatenated batch."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

WORLD = 2
I, H, T, B_PER_RANK = 7, 6, 5, 3


class _Model(nn.Module):
    """A packed bidirectional LSTM, a GRU, a GRUCell and a head."""

    def __init__(self):
        super().__init__()
        self.lstm = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=H - 2)
        self.gru = fusedrnn.GRU(2 * (H - 2), H, batch_first=True)
        self.cell = fusedrnn.GRUCell(H, H)
        self.head = nn.Linear(H, 1)

    def forward(self, x, lengths):
        out, _ = self.lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
        _, h = self.gru(out)
        return self.head(self.cell(h[0], h[0])).squeeze(-1)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, WORLD * B_PER_RANK, I, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (WORLD * B_PER_RANK,), generator=g)
    y = torch.randn(WORLD * B_PER_RANK, generator=g, dtype=torch.float64)
    return x, lengths, y


def _model():
    torch.manual_seed(1)
    return _Model().double()


def _grads(model, x, lengths, y):
    loss = (model(x, lengths) - y).square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _worker(rank, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # Rendezvous through a file: no port to pick beforehand (and lose in a race).
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
                            rank=rank, world_size=WORLD)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        x, lengths, y = _data()
        part = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
        grads = _grads(ddp, x[:, part], lengths[part], y[part])
        torch.save({n.removeprefix("module."): g for n, g in grads.items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Both ranks done with the wire before either tears gloo down: a rank
        # that destroys the group while its peer is still talking can abort
        # ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    want = _grads(_model(), *_data())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == want.keys()
        for name, g in got.items():
            torch.testing.assert_close(g, want[name], rtol=1e-10, atol=1e-12, msg=name)
