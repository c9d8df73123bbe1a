"""Training order that continues across stages instead of restarting.

Each LoRACoE stage is its own ``Trainer``, and a fresh Trainer replays the data from the first shuffle: a
stage shorter than an epoch would re-train on exactly the examples the previous stage saw and never reach
the rest. ``DataStreamSampler`` treats the data as one endless stream of seeded shuffles (epoch ``e`` is
``randperm(n)`` seeded with ``seed + e``, the order accelerate's seedable sampler gives a single-stage run)
and serves each Trainer epoch a window of it that starts where the earlier stages stopped.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class DataStreamSampler(Sampler[int]):
    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start
        self.epoch = 0  # set by Trainer before each epoch, also when resuming mid-stage

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def _shuffle(self, pass_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + pass_index)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        position = self.start + self.epoch * self.size
        pass_index, offset = divmod(position, self.size)
        order = self._shuffle(pass_index)
        yield from order[offset:]
        if offset:
            yield from self._shuffle(pass_index + 1)[:offset]
