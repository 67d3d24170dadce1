"""group_advantages: GRPO normalisation against numpy float64."""

import numpy as np
import pytest
import torch

import cepo_kernels as ck


@pytest.mark.parametrize("group_size", [2, 3, 8])
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_forward_matches_reference(group_size, scale_by_std):
    rewards = torch.rand(4 * group_size, generator=torch.Generator().manual_seed(group_size))
    got = ck.group_advantages(rewards, group_size, eps=1e-4, scale_by_std=scale_by_std)
    r = rewards.double().numpy().reshape(-1, group_size)
    want = r - r.mean(1, keepdims=True)
    if scale_by_std:
        want = want / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want.reshape(-1), rtol=1e-5, atol=1e-6)


def test_group_advantages_equal_rewards_give_zero_even_without_eps():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    got = ck.group_advantages(rewards, 3, eps=0.0)
    assert torch.equal(got[:3], torch.zeros(3)) and torch.all(torch.isfinite(got))


def test_group_advantages_integer_rewards_and_float64():
    assert ck.group_advantages(torch.tensor([1, 0, 0, 0]), 2).dtype == torch.float32
    assert ck.group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64


@pytest.mark.parametrize(
    "rewards,group_size,kwargs,message",
    [
        (torch.rand(6), 4, {}, "group_size: 4 does not divide"),
        (torch.rand(6), 0, {}, "group_size: expected an int >= 1"),
        (torch.rand(6), 1, {}, "group_size: expected >= 2"),
        (torch.rand(2, 3), 3, {}, "rewards: expected shape"),
        (torch.rand(6), 3, {"eps": -1.0}, "eps"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards, group_size, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ck.group_advantages(rewards, group_size, **kwargs)
