"""meshd.task.standardize: the mesh's moments by push-sum, the scaler, and what a peer may send of them."""

from __future__ import annotations

import random

import pytest
import torch

from meshd.core.averaging import RejectedUpdate
from meshd.task.standardize import STABLE_MERGES, MeshMoments, Scaler, local_moments


def _domain(seed: int, n: int, loc: float, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([1e-3, 1.0, scale]) + torch.tensor(
        [5e-3, 0.0, loc])


def test_push_pull_pairs_converge_to_the_pooled_mean_and_std() -> None:
    """Push-pull exchanges (each half merged, as the daemons do) reach the pooled rows' statistics, although
    every domain's first halves are masked: the masks cancel in the mesh's total."""
    xs = [_domain(i, n, loc, 1e6) for i, (n, loc) in enumerate(((300, 2e6), (50, 3e6), (900, 4e6), (10, 1e6)))]
    cols = (0, 1, 2)
    nodes = [MeshMoments(local_moments(x, cols), cols) for x in xs]
    total = sum(n.ps.numerator() for n in nodes)
    rng = random.Random(0)
    for k in range(400):
        i, j = rng.sample(range(len(nodes)), 2)
        mine = nodes[i].outgoing()
        theirs = nodes[j].outgoing(one_shot=True)  # the receiver's half, from before the merge
        assert mine is not None and theirs is not None
        if k == 0:  # a domain's own sums never leave in clear: the first half is noise around them
            clear = nodes[i].ps.estimate()
            assert float((mine.values - clear).abs().min()) > 1.0
        nodes[j].merge(mine.values, mine.weight)
        nodes[i].delivered(mine.id)
        nodes[i].merge(theirs.values, theirs.weight)
    torch.testing.assert_close(sum(n.ps.numerator() for n in nodes), total, rtol=1e-12, atol=1e-6)
    pooled = torch.cat(xs)
    for node in nodes:
        assert node.settled
        s = node.scaler()
        mean, std = torch.tensor(s.mean, dtype=torch.float64), torch.tensor(s.std, dtype=torch.float64)
        torch.testing.assert_close(mean, pooled.mean(dim=0), rtol=1e-9, atol=0.0)
        torch.testing.assert_close(std, pooled.std(dim=0, unbiased=False), rtol=1e-6, atol=0.0)


def test_settling_needs_still_merges_in_a_row() -> None:
    node = MeshMoments(local_moments(_domain(0, 10, 0.0, 1.0), (0, 1, 2)), (0, 1, 2))
    other = local_moments(_domain(1, 10, 5.0, 1.0), (0, 1, 2))
    node.merge(other, 1.0)
    assert not node.settled
    same = node.ps.estimate()
    for k in range(STABLE_MERGES):
        assert not node.settled, k
        node.merge(same, 1.0)  # a peer that already holds this estimate changes nothing
    assert node.settled
    node.merge(other, 1.0)  # news: not settled any more
    assert not node.settled


def test_scaler_applies_to_its_columns_only_and_checks_what_peers_send() -> None:
    s = Scaler((0, 2), (1.0, 10.0), (2.0, 5.0))
    x = torch.tensor([[3.0, 7.0, 20.0]])
    assert s.apply(x).tolist() == [[1.0, 7.0, 2.0]]
    mean, std = s.full(3)
    assert mean.tolist() == [1.0, 0.0, 10.0] and std.tolist() == [2.0, 1.0, 5.0]
    assert Scaler.from_wire(s.to_wire(), (0, 2)) == s
    for bad, why in (({**s.to_wire(), "columns": [0, 1]}, "other inputs"),
                     ({**s.to_wire(), "std": [2.0, 0.0]}, "> 0"),
                     ({**s.to_wire(), "mean": [1.0, float("nan")]}, "finite"),
                     ({**s.to_wire(), "mean": [1.0]}, "one number per"),
                     ("scaler", "other inputs")):
        with pytest.raises(ValueError, match=why):
            Scaler.from_wire(bad, (0, 2))


def test_a_constant_input_keeps_unit_scale_and_bad_halves_leave_the_state_alone() -> None:
    x = torch.tensor([[1.0, 4.0], [1.0, 6.0]], dtype=torch.float64)
    node = MeshMoments(local_moments(x, (0, 1)), (0, 1))
    s = node.scaler()
    assert s.mean == (1.0, 5.0) and s.std == (1.0, 1.0)  # column 0 is constant: divided by 1, not by 0
    before = node.ps.estimate()
    with pytest.raises(RejectedUpdate):
        node.merge(torch.tensor([1.0, float("inf"), 0.0, 0.0, 0.0], dtype=torch.float64), 0.5)
    assert torch.equal(node.ps.estimate(), before) and node.merges == 0


def test_a_lost_masked_half_leaves_the_state_as_it_was() -> None:
    node = MeshMoments(local_moments(_domain(0, 20, 1e6, 1e6), (0, 1, 2)), (0, 1, 2))
    before = node.ps.numerator()
    share = node.outgoing()
    assert share is not None and node.ps.pending == 1
    node.lost(share.id)
    assert node.ps.pending == 0 and torch.equal(node.ps.numerator(), before)
