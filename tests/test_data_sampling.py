import pytest

from beit3.data.sampling import StepBatchSampler


def test_batches_are_a_function_of_the_step():
    full = list(StepBatchSampler(10, 3, seed=1, num_steps=8))
    resumed = list(StepBatchSampler(10, 3, seed=1, start_step=5, num_steps=3))
    assert resumed == full[5:]
    first_epoch = [i for batch in full for i in batch][:10]
    assert sorted(first_epoch) == list(range(10))  # every example once per epoch


def test_ranks_split_each_step_without_overlap():
    a = list(StepBatchSampler(12, 3, seed=0, rank=0, world_size=2, num_steps=2))
    b = list(StepBatchSampler(12, 3, seed=0, rank=1, world_size=2, num_steps=2))
    assert sorted(i for batch in a + b for i in batch) == list(range(12))


def test_evaluation_order_is_one_ordered_pass():
    assert list(StepBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(StepBatchSampler(7, 2, shuffle=False, rank=1, world_size=2)) == [[2, 3], [6]]
    with pytest.raises(ValueError, match="empty"):
        StepBatchSampler(0, 2)
