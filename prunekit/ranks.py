"""What each process of a torchrun job sees: its rank, its share of every batch.

Outside a job (rank 0 of 1) every helper here is the identity: the whole data.
"""

from __future__ import annotations

import torch.distributed as dist

from prunekit.data import DataBundle
from prunekit.types import LabelKey, batch_to, num_rows, take_rows


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RankSlice:
    """This rank's share of each global batch (examples rank, rank + world, ...).

    Every rank draws the same global permutation (same generator state), so together the
    ranks see exactly the batches of a one-process run; DDP averages their gradients.
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        share = slice(self.rank, None, self.world)
        for batch in self.batches:
            yield take_rows(batch, share)


def score_batches_of(data: DataBundle, examples: int, device, batch: int = 250) -> list:
    """The first ``examples`` training examples, this rank's share of them in a job, in
    batches of ``batch`` (the scoring passes' memory grows with it)."""
    rank, world = rank_and_world()
    share = slice(rank, None, world)
    first = take_rows((data.x_train, data.y_train), slice(0, examples))
    x, y = take_rows(first, share)
    n = num_rows(x)
    return [
        batch_to(take_rows(x if y is None else (x, y), slice(i, i + batch)), device)
        for i in range(0, n, batch)
    ]


def label_key(seed: int, step: int) -> LabelKey:
    """The key of step ``step``'s sampled Fisher labels on this rank.

    This rank's score batches hold examples rank, rank + world, ... of the score set
    (``score_batches_of``), so its j-th example is global example rank + world * j: every
    example gets the labels of a one-process run, whatever the world and batch sizes.
    """
    rank, world = rank_and_world()
    return LabelKey(seed=seed, step=step, offset=rank, stride=world)
