"""RandomSubsetSampler and WeightedSubsetSampler: a reproducible per-epoch draw, the same budget on one process or
sharded over ranks."""

from __future__ import annotations

import pytest

from ctan_monai.data import RandomSubsetSampler, WeightedSubsetSampler


def _draw(epoch: int, **kwargs) -> list[int]:
    sampler = RandomSubsetSampler(range(50), **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_draw_depends_on_seed_and_epoch_only():
    first = _draw(3, num_samples=16, seed=7)
    assert len(first) == 16 and len(set(first)) == 16  # without replacement
    assert first == _draw(3, num_samples=16, seed=7)  # a resumed run redraws the same slices
    assert first != _draw(4, num_samples=16, seed=7)
    assert first != _draw(3, num_samples=16, seed=8)
    assert sorted(_draw(0, num_samples=None)) == list(range(50))


def test_budget_larger_than_dataset_repeats_permutations():
    indices = _draw(0, num_samples=120)
    assert len(indices) == 120
    assert sorted(indices[:50]) == list(range(50))


def test_ranks_share_one_draw():
    single = _draw(2, num_samples=20, seed=1)
    shards = [_draw(2, num_samples=20, seed=1, num_replicas=4, rank=r) for r in range(4)]
    assert all(len(s) == 5 for s in shards)
    assert sorted(i for s in shards for i in s) == sorted(single)


@pytest.mark.parametrize("bad", ["null", 0, -3, 2.5, True])
def test_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="positive integer or None"):
        RandomSubsetSampler(range(10), num_samples=bad)


def test_empty_dataset_and_missing_process_group_are_refused():
    with pytest.raises(ValueError, match="empty dataset"):
        RandomSubsetSampler([], num_samples=4)
    with pytest.raises(ValueError, match="process group"):
        RandomSubsetSampler(range(10), num_samples=4, distributed=True)


def test_weighted_draw_follows_the_weights_and_never_draws_a_zero_weight():
    sampler = WeightedSubsetSampler([1.0, 0.0, 3.0], num_samples=8000, seed=5)
    sampler.set_epoch(2)
    drawn = list(sampler)
    assert len(drawn) == 8000 and 1 not in drawn
    assert abs(drawn.count(2) / 8000 - 0.75) < 0.02
    again = WeightedSubsetSampler([1.0, 0.0, 3.0], num_samples=8000, seed=5)
    again.set_epoch(2)
    assert list(again) == drawn  # seed and epoch only: a resumed run redraws the same images
    assert len(WeightedSubsetSampler([1.0, 2.0])) == 2  # default budget: one draw per index


@pytest.mark.parametrize("weights", [[1.0, -1.0], [float("nan"), 1.0], [0.0, 0.0]])
def test_weighted_sampler_refuses_bad_weights(weights):
    with pytest.raises(ValueError, match="finite, non-negative and not all zero"):
        WeightedSubsetSampler(weights)


def test_weighted_ranks_share_one_draw():
    def draw(**kwargs) -> list[int]:
        sampler = WeightedSubsetSampler([1.0, 2.0, 0.5, 4.0], num_samples=20, seed=3, **kwargs)
        sampler.set_epoch(1)
        return list(sampler)

    single = draw()
    shards = [draw(num_replicas=4, rank=r) for r in range(4)]
    assert all(len(s) == 5 for s in shards)
    assert [shards[i % 4][i // 4] for i in range(20)] == single  # rank r takes every 4th index from r
