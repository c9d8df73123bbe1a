"""Training order across stages: a later stage continues through the data instead of replaying it."""

import torch
from torch.utils.data import RandomSampler
from transformers import TrainingArguments

from qmoe.sampling import DataStreamSampler
from qmoe.trainer import QmoeTrainer


def test_first_stage_order_is_the_single_stage_order():
    # accelerate's seedable sampler: epoch e is randperm(n) with the generator seeded data_seed + e
    for size in (7, 64):
        for epoch in range(3):
            generator = torch.Generator().manual_seed(42 + epoch)
            sampler = DataStreamSampler(size, seed=42)
            sampler.set_epoch(epoch)
            assert list(sampler) == list(RandomSampler(range(size), generator=generator))


def test_a_window_continues_the_stream_across_epochs():
    stream = []
    whole = DataStreamSampler(10, seed=3)
    for epoch in range(4):
        whole.set_epoch(epoch)
        stream += list(whole)
    later = DataStreamSampler(10, seed=3, start=13)
    windows = []
    for epoch in range(2):
        later.set_epoch(epoch)
        windows += list(later)
    assert windows == stream[13 : 13 + 20]
    # the stream visits every example once per pass, wherever a window starts
    assert all(sorted(stream[i : i + 10]) == list(range(10)) for i in range(0, 40, 10))


class _Scalar(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x=None, **_):
        return {"loss": (self.w * x.float()).sum()}


def _batches(tmp_path, step_offset: int, steps: int) -> list[list[int]]:
    args = TrainingArguments(
        output_dir=str(tmp_path / f"stage{step_offset}"),
        per_device_train_batch_size=4,
        max_steps=steps,
        seed=42,
        data_seed=42,
        report_to=[],
        use_cpu=True,
    )
    trainer = QmoeTrainer(
        model=_Scalar(),
        args=args,
        train_dataset=[{"x": i} for i in range(16)],
        data_collator=lambda rows: {"x": torch.tensor([r["x"] for r in rows])},
        step_offset=step_offset,
    )
    loader = trainer.get_train_dataloader()
    return [batch["x"].tolist() for batch, _ in zip(loader, range(steps), strict=False)]


def test_second_stage_trainer_sees_the_examples_the_first_did_not(tmp_path):
    first = _batches(tmp_path, step_offset=0, steps=2)  # 8 of 16 examples
    second = _batches(tmp_path, step_offset=2, steps=2)  # the other 8, not the same 8 again
    seen_first = {i for batch in first for i in batch}
    seen_second = {i for batch in second for i in batch}
    assert len(seen_first) == 8 and seen_first.isdisjoint(seen_second)
    assert seen_first | seen_second == set(range(16))
