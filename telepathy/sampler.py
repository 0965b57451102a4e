"""Which training examples each rank reads at each optimizer step: deterministic, resumable, length-grouped.

The whole schedule is a pure function of (seed, epoch, global batch): per epoch the examples are shuffled,
optionally grouped into mega-batches sorted by sender length (so a batch pads little), cut into global
batches, and the batch order is shuffled again. The only state is (epoch, position), so a resumed run reads
exactly the batches the uninterrupted run would have read, however it was interrupted.

A global batch of `micro_batch * grad_accum * world` examples is cut into `grad_accum * world` micro-batches;
micro-batch j goes to rank j % world at accumulation index j // world. One process with
`grad_accum * world` accumulation steps therefore sees the very same micro-batches, which is what makes
runs on different GPU counts comparable, and the ranks of one micro-step get neighbouring lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from telepathy.errors import UserError

MEGA_BATCHES = 50  # global batches per length-sorted group: long enough to sort well, short enough to stay random


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # global batches of `epoch` already consumed
    global_batch: int = 0  # the schedule only continues under the same global batch


class StepSampler:
    """`next_step()` -> this rank's `grad_accum` micro-batches (lists of example indices) for one optimizer step."""

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        micro_batch: int,
        grad_accum: int,
        world_size: int,
        rank: int,
        seed: int,
        length_grouped: bool = True,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch, self.grad_accum, self.world_size, self.rank = micro_batch, grad_accum, world_size, rank
        self.seed, self.length_grouped = seed, length_grouped
        self.global_batch = micro_batch * grad_accum * world_size
        if len(self.lengths) < self.global_batch:
            raise UserError(
                f"the training set has {len(self.lengths)} examples, fewer than one global batch of "
                f"{self.global_batch} (micro_batch {micro_batch} x grad_accum {grad_accum} x {world_size} GPUs); "
                "lower train.micro_batch/grad_accum or use more training data"
            )
        self.state = SamplerState(global_batch=self.global_batch)
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.lengths) // self.global_batch

    def global_batches(self, epoch: int) -> np.ndarray:
        """(steps_per_epoch, global_batch) example indices of one epoch, in reading order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.global_batch]  # drop the tail
        if self.length_grouped:
            mega = self.global_batch * MEGA_BATCHES
            groups = [order[i : i + mega] for i in range(0, len(order), mega)]
            # longest first inside a group; stable so equal lengths keep their shuffled order
            order = np.concatenate([g[np.argsort(-self.lengths[g], kind="stable")] for g in groups])
        batches = order.reshape(self.steps_per_epoch, self.global_batch)
        batches = batches[rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def micro_batches(self, global_batch: np.ndarray) -> list[list[int]]:
        """This rank's share of one global batch, in accumulation order."""
        rows = global_batch.reshape(self.grad_accum * self.world_size, self.micro_batch)
        return [row.tolist() for row in rows[self.rank :: self.world_size]]

    def next_step(self) -> list[list[int]]:
        micro = self.peek_step()
        if self.state.position >= self.steps_per_epoch:
            self.state.epoch, self.state.position = self.state.epoch + 1, 0
        self.state.position += 1
        return micro

    def peek_step(self) -> list[list[int]]:
        """What next_step will return, without moving: lets the trainer stage the next batches early."""
        epoch, position = self.state.epoch, self.state.position
        if position >= self.steps_per_epoch:
            epoch, position = epoch + 1, 0
        return self.micro_batches(self.global_batches(epoch)[position])

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        state = SamplerState(**d)
        if state.global_batch != self.global_batch:
            raise UserError(
                f"the checkpoint was written with a global batch of {state.global_batch} examples, this run has "
                f"{self.global_batch}; resume with the same micro_batch x grad_accum x GPUs or use a new run folder"
            )
        self.state = state
