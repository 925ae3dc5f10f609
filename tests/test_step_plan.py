"""The step plan (which forget samples each step and rank take) and the lr schedule: pure functions."""
import dataclasses

import pytest
import torch

from fastgeffect.training.plan import epoch_order, plan_step, steps_per_epoch, warmup_linear

# (n_samples, batch_size, grad_accum, world): full batches, short last batches, one and several processes
SETTINGS = [(9, 4, 1, 1), (9, 4, 2, 1), (9, 4, 4, 1), (10, 4, 4, 1), (9, 4, 2, 2), (9, 4, 1, 2), (9, 4, 1, 4),
            (40, 16, 2, 4), (17, 8, 2, 2), (5, 6, 3, 1)]


def old_global_chunks(n, batch_size, grad_accum, world, seed, epoch, b):
    """The formula ``Unlearner.global_chunks`` used before the step plan."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    idx = order[b * batch_size:(b + 1) * batch_size].tolist()
    n_micro = world * grad_accum
    n_micro = min(n_micro, len(idx)) if world == 1 else n_micro
    return [idx[i::n_micro] for i in range(n_micro)]


def plans(n, batch_size, grad_accum, world, seed=3, epoch=1):
    for b in range(steps_per_epoch(n, batch_size)):
        yield b, [plan_step(n, batch_size, grad_accum, world, r, seed, epoch, b) for r in range(world)]


@pytest.mark.parametrize("n,batch_size,grad_accum,world", SETTINGS)
def test_same_chunks_as_before(n, batch_size, grad_accum, world):
    for b, per_rank in plans(n, batch_size, grad_accum, world):
        old = old_global_chunks(n, batch_size, grad_accum, world, 3, 1, b)
        for r, plan in enumerate(per_rank):
            assert [list(c) for c in plan.global_chunks] == old
            per = len(old) // world
            mine = old[r * per:(r + 1) * per]
            assert [list(c) for c in plan.chunks] == mine
            assert list(plan.weights) == [1.0 if c else 0.0 for c in mine]
            assert [list(c) for c in plan.loaded] == [c or old[0][:1] for c in mine]
            assert (plan.epoch, plan.batch) == (1, b)


@pytest.mark.parametrize("n,batch_size,grad_accum,world", SETTINGS)
def test_chunks_partition_the_step_and_ranks_share_them(n, batch_size, grad_accum, world):
    order = epoch_order(n, 3, 1).tolist()
    seen = []
    for b, per_rank in plans(n, batch_size, grad_accum, world):
        step = order[b * batch_size:(b + 1) * batch_size]
        chunks = per_rank[0].global_chunks
        assert sorted(i for c in chunks for i in c) == sorted(step)  # a partition: disjoint and covering
        assert all(p.global_chunks == chunks for p in per_rank)
        assert sum((p.chunks for p in per_rank), ()) == chunks  # rank shares: disjoint, in order, covering
        if world > 1:
            assert all(len(p.chunks) == grad_accum for p in per_rank)  # every rank runs the same collectives
        else:
            assert len(chunks) == min(grad_accum, len(step))
            assert all(c for c in chunks)
        seen += step
    assert sorted(seen) == list(range(n))  # an epoch sees every sample once


def test_short_last_batch_gives_zero_weight_ranks():
    # 9 samples, batch 4: the last step has one sample; 2 ranks x 2 micro-batches
    (_, last), = [x for x in plans(9, 4, 2, 2) if x[0] == 2]
    first = last[0].global_chunks[0]
    assert len(first) == 1
    assert last[0].weights == (1.0, 0.0) and last[1].weights == (0.0, 0.0)
    assert last[0].loaded == (first, first) and last[1].loaded == (first, first)
    # one process: no empty micro-batch, one per sample
    (_, alone), = [x for x in plans(9, 4, 2, 1) if x[0] == 2]
    assert alone[0].chunks == (first,) and alone[0].weights == (1.0,)


def test_plan_is_frozen():
    plan = plan_step(9, 4, 2, 1, 0, 0, 0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.weights = (0.0,)


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(10, 3, 1)
    assert sorted(a.tolist()) == list(range(10))
    assert torch.equal(a, epoch_order(10, 3, 1))
    assert not torch.equal(a, epoch_order(10, 3, 2))


def test_steps_per_epoch():
    assert [steps_per_epoch(n, 4) for n in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


def test_warmup_linear():
    f = warmup_linear(total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert [f(s) for s in (4, 7, 10, 11)] == [1.0, 0.5, 0.0, 0.0]
    assert warmup_linear(3, 3)(2) == 1.0 and warmup_linear(3, 3)(3) == 0.0  # no decay phase
