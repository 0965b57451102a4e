"""The step sampler: deterministic, exact resume, rank split == one process with more accumulation."""

import numpy as np
import pytest

from telepathy.errors import UserError
from telepathy.sampler import StepSampler

LENGTHS = np.random.default_rng(0).integers(4, 128, size=1000).tolist()


def make(rank=0, world=1, accum=2, micro=4, seed=7, grouped=True, lengths=LENGTHS):
    return StepSampler(
        lengths, micro_batch=micro, grad_accum=accum, world_size=world, rank=rank, seed=seed, length_grouped=grouped
    )


def run(s, steps):
    return [s.next_step() for _ in range(steps)]


def test_epoch_is_a_permutation_without_repeats():
    s = make()
    batches = s.global_batches(0)
    assert batches.shape == (1000 // 8, 8)
    assert len(set(batches.ravel().tolist())) == batches.size
    assert not np.array_equal(batches, s.global_batches(1))  # a new shuffle per epoch


def test_same_seed_same_schedule_other_seed_differs():
    assert run(make(), 30) == run(make(), 30)
    assert run(make(), 30) != run(make(seed=8), 30)


def test_ranks_together_read_what_one_process_reads():
    world, accum = 2, 3
    single = run(make(world=1, accum=accum * world), 200)  # 41 steps per epoch: crosses epoch boundaries
    ranks = [run(make(rank=r, world=world, accum=accum), 200) for r in range(world)]
    for step in range(200):
        # micro-step a of rank r is micro-batch a * world + r of the single process
        interleaved = [ranks[r][step][a] for a in range(accum) for r in range(world)]
        assert interleaved == single[step]


@pytest.mark.parametrize("stop", [1, 61, 62, 124, 125, 300])
def test_resume_continues_exactly(stop):
    s = make()
    full = run(s, 400)
    first = make()
    head = run(first, stop)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + run(resumed, 400 - stop) == full


def test_length_grouping_cuts_padding():
    def padding(grouped):
        s = make(grouped=grouped, accum=1)
        lengths = np.asarray(LENGTHS)
        pads = [lengths[mb].max() * len(mb) - lengths[mb].sum() for step in run(s, s.steps_per_epoch) for mb in step]
        return sum(pads)

    assert padding(True) < 0.2 * padding(False)


def test_grouped_batches_are_shuffled_not_sorted():
    s = make(accum=1)
    first_lengths = [np.asarray(LENGTHS)[mb[0]].max() for (mb,) in run(s, 40)]
    assert first_lengths != sorted(first_lengths, reverse=True)


def test_mismatched_global_batch_is_refused():
    s = make(accum=2)
    run(s, 3)
    other = make(accum=4)
    with pytest.raises(UserError, match="global batch"):
        other.load_state_dict(s.state_dict())


def test_too_little_data_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one global batch"):
        make(lengths=[5] * 7)
