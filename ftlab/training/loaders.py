"""Training loaders whose order is a function of ``(seed, epoch)`` and whose position goes
into the checkpoint, so a resumed run sees exactly the batches it would have seen.

:class:`ResumableLoader` draws each epoch's order from ``(seed, epoch)`` alone and tells
Lightning (through ``state_dict``) how many batches of the epoch were used, so a restart
skips exactly those, without loading them; loaders own their generators, so iterating them
takes nothing from the global one (dropout masks continue as they would have).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler


class SeededSampler(Sampler[int]):
    """A permutation of ``range(n)`` that is a function of ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each epoch. Unlike ``RandomSampler`` (which seeds
    itself from the global generator when iterated), the order of any epoch can be recomputed
    after a restart, and iterating consumes nothing from the global generator."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that can stop mid-epoch and continue at the next batch.

    Lightning keeps :meth:`state_dict` (epoch, batches used in it) in the checkpoint and hands
    it to :meth:`load_state_dict` before iterating again; the first epoch after that skips the
    used batches at the index level (no example is loaded twice or collated for nothing).
    Skipping after sharding, it also stays right when Lightning wraps the sampler for DDP.
    Same constructor as ``DataLoader``, so Lightning can rebuild it with another sampler.
    """

    _epoch = 0
    _consumed = 0
    _resume_at: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._epoch), "batches": int(self._consumed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # stopped after the last batch: the next epoch starts afresh
            epoch, batches = epoch + 1, 0
        self._resume_at = (epoch, batches)
        if callable(getattr(self.sampler, "set_epoch", None)):
            # With worker processes the first indices are drawn when the iterator is built,
            # before Lightning's set_epoch for the resumed epoch.
            self.sampler.set_epoch(epoch)

    @property
    def _index_sampler(self):
        return _SkipUsed(super()._index_sampler, self)

    def __iter__(self):
        return _Counted(super().__iter__(), self)


class _SkipUsed:
    """The loader's batch-index sampler, minus the batches a restored epoch already used."""

    def __init__(self, base, loader: ResumableLoader):
        self.base, self.loader = base, loader

    def __len__(self) -> int:
        return len(self.base)  # Lightning counts the epoch's batches as if none were skipped

    def __iter__(self):
        loader = self.loader
        epoch = getattr(loader.sampler, "epoch", None)
        epoch = loader._epoch + 1 if epoch is None else int(epoch)
        skip = 0
        if loader._resume_at is not None:
            if loader._resume_at[0] == epoch:
                skip = loader._resume_at[1]
            loader._resume_at = None
        loader._epoch, loader._consumed = epoch, skip
        for i, indices in enumerate(self.base):
            if i >= skip:
                yield indices


class _Counted:
    """The loader's iterator, counting the batches handed out (with worker processes the index
    sampler runs ahead of what training has used)."""

    def __init__(self, iterator, loader: ResumableLoader):
        self.iterator, self.loader = iterator, loader

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.loader._consumed += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)


def resumable_loader(loader: DataLoader, seed: int) -> ResumableLoader:
    """The same batches as ``loader``, in an order fixed by ``seed`` and the epoch, resumable.

    A ``RandomSampler`` (``shuffle=True``) becomes a :class:`SeededSampler`; a sampler with its
    own ``set_epoch`` (length-grouped batches) is kept. Any other loader is returned as it is,
    with a warning: training works, but a resumed run starts its epoch over."""
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        sampler = SeededSampler(len(loader.dataset), seed)
    elif loader.batch_size is None or not (isinstance(sampler, SequentialSampler)
                                           or callable(getattr(sampler, "set_epoch", None))):
        warnings.warn(f"the training loader ({type(loader.batch_sampler or sampler).__name__}) cannot be "
                      "replayed from a checkpoint; a resumed run will not continue exactly", stacklevel=2)
        return loader
    return ResumableLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        # Its own generator: worker seeds are drawn from it, not from the global one.
        generator=torch.Generator().manual_seed(int(seed)),
    )


def own_generator(loader: DataLoader) -> DataLoader:
    """``loader`` (not shuffled) rebuilt with its own generator. Every iteration of a
    ``DataLoader`` draws a base seed for its workers, from the global generator unless it has
    one: validation inside fit would otherwise shift the dropout masks of later steps."""
    if loader.generator is not None or loader.batch_size is None:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      generator=torch.Generator().manual_seed(0))
