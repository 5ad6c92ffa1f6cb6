"""meshd.core.averaging: push-sum with acknowledged shares, simulated in memory (no network, no sleeps)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch

from meshd.core.averaging import (
    DISTANCE_WINDOW,
    MAX_VERSION,
    MAX_VERSION_STEP,
    PushSum,
    PushSumState,
    RejectedUpdate,
    ServedModel,
    Share,
    consensus_distance,
    data_scale,
)
from meshd.core.codec import CodecError, CodecName, decode, encode
from meshd.errors import MeshdError

DIM = 100


# -- a simulated in-memory network ----------------------------------------------------------------


def make_nodes(n: int, seed: int, codec: CodecName = "f64", dim: int = DIM) -> tuple[list[PushSum], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return [PushSum(start[i].clone(), codec=codec) for i in range(n)], start.mean(dim=0)


def transmit(share: Share, codec: CodecName) -> torch.Tensor:
    """What the receiver decodes from the wire."""
    return decode(encode(share.values, codec), share.values.shape[0], codec)


def mass(nodes: list[PushSum]) -> tuple[torch.Tensor, float]:
    return torch.stack([node.numerator() for node in nodes]).sum(dim=0), math.fsum(n.weight for n in nodes)


def gossip_round(
    nodes: list[PushSum],
    rng: random.Random,
    *,
    fanout: int = 1,
    loss: float = 0.0,
    after_message: Callable[[], None] | None = None,
) -> None:
    """Everyone prepares, then messages are delivered (or lost: abandoned), then acknowledged."""
    n = len(nodes)
    sends: list[tuple[int, int, Share]] = []
    for i, node in enumerate(nodes):
        peers = rng.sample([j for j in range(n) if j != i], fanout)
        sends.extend((i, j, share) for j, share in zip(peers, node.prepare(fanout), strict=True))
    for i, j, share in sends:
        if rng.random() < loss:
            assert nodes[i].abandon(share.id)
        else:
            nodes[j].merge(transmit(share, nodes[i].codec), share.weight, share.version)
            assert nodes[i].confirm(share.id)
        if after_message is not None:
            after_message()


def max_distance(nodes: list[PushSum], target: torch.Tensor) -> float:
    return max(consensus_distance(node.estimate(), target) for node in nodes)


def rounds_to(nodes: list[PushSum], target: torch.Tensor, rng: random.Random, tol: float, limit: int) -> int | None:
    for rnd in range(1, limit + 1):
        gossip_round(nodes, rng)
        if max_distance(nodes, target) <= tol:
            return rnd
    return None


# -- consensus -------------------------------------------------------------------------------------


def test_acceptance_32_nodes_exact_mean_within_60_rounds() -> None:
    nodes, mean = make_nodes(32, seed=1)
    rounds = rounds_to(nodes, mean, random.Random(1), tol=1e-6, limit=60)
    print(f"n=32 f64: {rounds} rounds to 1e-6")
    assert rounds is not None and rounds <= 60


def test_rounds_to_consensus_by_size() -> None:
    found = {}
    for n in (8, 32, 96):
        nodes, mean = make_nodes(n, seed=2)
        found[n] = rounds_to(nodes, mean, random.Random(2), tol=1e-6, limit=120)
    print(f"rounds to 1e-6 (f64, fanout 1): {found}")
    assert all(r is not None for r in found.values())
    assert found[96] <= 2 * found[8]  # type: ignore[operator]  # logarithmic, not linear, in n


def test_f32_codec_also_reaches_1e6() -> None:
    # f32 quantization error is ~6e-8 relative per value; mass stays exact, so the floor is ~3e-8.
    nodes, mean = make_nodes(32, seed=3, codec="f32")
    rounds = rounds_to(nodes, mean, random.Random(3), tol=1e-6, limit=60)
    assert rounds is not None
    rng = random.Random(4)
    for _ in range(40):
        gossip_round(nodes, rng)
    assert max_distance(nodes, mean) < 2e-7


def test_f16_codec_keeps_mass_exact_but_nodes_stop_at_its_precision() -> None:
    nodes, mean = make_nodes(16, seed=5, codec="f16")
    s0, w0 = mass(nodes)
    rng = random.Random(5)
    for _ in range(80):
        gossip_round(nodes, rng)
    s, w = mass(nodes)
    assert consensus_distance(s / w, mean) < 1e-12  # the mesh-wide average is still the exact mean
    assert math.isclose(w, w0, rel_tol=1e-12)
    assert torch.allclose(s, s0, rtol=0, atol=1e-12)
    assert max_distance(nodes, mean) < 1e-2  # each node: about f16 precision, not better


def test_loss_20_percent_still_exact_and_mass_conserved_at_every_step() -> None:
    nodes, mean = make_nodes(32, seed=6)
    s0, w0 = mass(nodes)
    scale = float(s0.abs().max())

    def check() -> None:
        s, w = mass(nodes)
        assert abs(w - w0) <= 1e-12 * w0
        assert float((s - s0).abs().max()) <= 1e-12 * scale

    rng = random.Random(6)
    rounds = 0
    while max_distance(nodes, mean) > 1e-6 and rounds < 150:
        gossip_round(nodes, rng, loss=0.2, after_message=check)
        rounds += 1
    print(f"n=32, 20% loss: {rounds} rounds to 1e-6")
    assert max_distance(nodes, mean) <= 1e-6
    assert all(node.pending == 0 for node in nodes)


def test_duplicate_delivery_creates_mass_without_replay_guard() -> None:
    """Why the wire's replay guard matters: a share merged twice is mass from nowhere."""
    nodes, mean = make_nodes(8, seed=7)
    _, w0 = mass(nodes)
    rng = random.Random(7)
    a, b = nodes[0], nodes[1]
    (share,) = a.prepare(1)
    b.merge(share.values, share.weight, share.version)
    b.merge(share.values, share.weight, share.version)  # the duplicate
    a.confirm(share.id)
    _, w = mass(nodes)
    assert w == pytest.approx(w0 + share.weight)
    for _ in range(80):
        gossip_round(nodes, rng)
    assert max_distance(nodes, mean) > 1e-3  # consensus, but on the wrong value
    s, w = mass(nodes)
    assert max_distance(nodes, s / w) < 1e-6


def test_lost_ack_is_a_duplicate_so_the_shell_must_retry_not_abandon() -> None:
    """A delivered share whose ack is lost must not be abandoned: that too creates mass.

    The safe shell resends the *same* message until acknowledged; the replay guard drops the copy and
    the receiver acknowledges again. Abandon only when the share certainly was not merged.
    """
    nodes, _ = make_nodes(4, seed=8)
    _, w0 = mass(nodes)
    (share,) = nodes[0].prepare(1)
    nodes[1].merge(share.values, share.weight, share.version)
    nodes[0].abandon(share.id)  # wrongly: it was delivered
    assert mass(nodes)[1] == pytest.approx(w0 + share.weight)


# -- shares ----------------------------------------------------------------------------------------


def test_prepare_takes_fractions_of_free_mass_and_weight_stays_positive() -> None:
    node = PushSum(torch.ones(3, dtype=torch.float64), weight=1.0, codec="f64")
    (a,) = node.prepare(1)
    b, c = node.prepare(2)
    assert a.weight == 0.5
    assert b.weight == c.weight == pytest.approx(0.5 / 3)
    assert node.pending == 3 and node.weight == 1.0  # nothing subtracted before confirm
    for share in (a, b, c):
        assert node.confirm(share.id)
    assert node.weight == pytest.approx(0.5 / 3)
    assert node.weight > 0
    assert torch.allclose(node.estimate(), torch.ones(3, dtype=torch.float64))


def test_confirm_and_abandon_of_unknown_ids() -> None:
    node = PushSum(torch.ones(3, dtype=torch.float64))
    (share,) = node.prepare(1)
    assert not node.confirm(share.id + 100)
    assert not node.abandon(share.id + 100)
    assert node.confirm(share.id)
    assert not node.confirm(share.id)  # twice
    assert not node.abandon(share.id)  # after confirm
    (share2,) = node.prepare(1)
    assert node.abandon(share2.id)
    assert not node.confirm(share2.id)  # after abandon
    assert node.weight == 0.5


def test_pending_is_bounded() -> None:
    node = PushSum(torch.ones(2, dtype=torch.float64), max_pending=3)
    shares = node.prepare(5)
    assert len(shares) == 3 and all(s.weight == 0.25 for s in shares)
    assert node.prepare(1) == []
    assert node.rounds == 1
    assert node.abandon_all() == 3 and node.pending == 0
    assert len(node.prepare(1)) == 1
    with pytest.raises(ValueError):
        node.prepare(0)


def test_confirm_after_state_changed_conserves_mass() -> None:
    """Training and merges between prepare and confirm: the stored share is what gets subtracted."""
    nodes, _ = make_nodes(3, seed=9, codec="f32")
    s0, w0 = mass(nodes)
    a, b, c = nodes
    (share,) = a.prepare(1)
    (other,) = c.prepare(1)
    a.merge(transmit(other, "f32"), other.weight, other.version)
    c.confirm(other.id)
    delta = torch.full((DIM,), 0.1, dtype=torch.float64)
    a.apply_update(delta)
    w_a = a.weight
    b.merge(transmit(share, "f32"), share.weight, share.version)
    a.confirm(share.id)
    s, w = mass(nodes)
    assert w == pytest.approx(w0, rel=1e-15)
    assert torch.allclose(s, s0 + delta * w_a, rtol=0, atol=1e-12)
    assert a.weight > 0


def test_share_values_are_codec_quantized() -> None:
    node = PushSum(torch.tensor([1 / 3, 2 / 3], dtype=torch.float64), codec="f32")
    (share,) = node.prepare(1)
    assert share.values.dtype == torch.float64
    assert torch.equal(share.values, torch.tensor([1 / 3, 2 / 3]).double())  # float32 round trip
    assert torch.equal(transmit(share, "f32"), share.values)


def test_f16_overflow_at_prepare_leaves_state_untouched() -> None:
    node = PushSum(torch.tensor([1e5, 1.0], dtype=torch.float64), codec="f16")
    with pytest.raises(CodecError):
        node.prepare(1)
    assert node.pending == 0 and node.rounds == 0
    with pytest.raises(CodecError):
        node.split_for_pull()
    assert node.weight == 1.0


# -- robust merge ----------------------------------------------------------------------------------


def _snapshot(node: PushSum) -> tuple[bytes, float, int, int, float | None]:
    return (encode(node.numerator(), "f64"), node.weight, node.version, node.merges, node.mean_distance)


_GOOD = torch.ones(4, dtype=torch.float64)


@pytest.mark.parametrize(
    ("values", "weight", "version"),
    [
        pytest.param(torch.tensor([1.0, float("nan"), 0.0, 0.0], dtype=torch.float64), 0.5, 1, id="nan"),
        pytest.param(torch.tensor([1.0, float("inf"), 0.0, 0.0], dtype=torch.float64), 0.5, 1, id="inf"),
        pytest.param(torch.tensor([1.0, -1e7, 0.0, 0.0], dtype=torch.float64), 0.5, 1, id="oversized"),
        pytest.param(torch.ones(5, dtype=torch.float64), 0.5, 1, id="too-long"),
        pytest.param(torch.ones(3, dtype=torch.float64), 0.5, 1, id="too-short"),
        pytest.param(torch.ones(2, 2, dtype=torch.float64), 0.5, 1, id="2-d"),
        pytest.param(torch.ones(4, dtype=torch.float32), 0.5, 1, id="float32"),
        pytest.param(torch.ones(4, dtype=torch.int64), 0.5, 1, id="int64"),
        pytest.param([1.0, 1.0, 1.0, 1.0], 0.5, 1, id="list"),
        pytest.param(_GOOD, -0.5, 1, id="negative-weight"),
        pytest.param(_GOOD, 0.0, 1, id="zero-weight"),
        pytest.param(_GOOD, float("nan"), 1, id="nan-weight"),
        pytest.param(_GOOD, float("inf"), 1, id="inf-weight"),
        pytest.param(_GOOD, 2e9, 1, id="weight-above-max"),
        pytest.param(_GOOD, True, 1, id="bool-weight"),
        pytest.param(_GOOD, "0.5", 1, id="str-weight"),
        pytest.param(_GOOD, 0.5, -1, id="negative-version"),
        pytest.param(_GOOD, 0.5, 1.5, id="float-version"),
        pytest.param(_GOOD, 0.5, 2**64 - 1, id="version-2**64-1"),
        pytest.param(_GOOD, 0.5, MAX_VERSION + 1, id="version-above-max"),
    ],
)
def test_rejected_updates_leave_state_bitwise_unchanged(values: object, weight: object, version: object) -> None:
    node = PushSum(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), version=3)
    node.merge(torch.full((4,), 0.7, dtype=torch.float64), 0.25, 2)
    before = _snapshot(node)
    with pytest.raises(RejectedUpdate) as err:
        node.merge(values, weight, version)  # type: ignore[arg-type]
    assert err.value.reason == "bad_values"
    assert _snapshot(node) == before
    with pytest.raises(RejectedUpdate):
        node.adopt(values, weight, version)  # type: ignore[arg-type]
    assert _snapshot(node) == before


def test_rejected_update_is_a_value_error() -> None:
    assert issubclass(RejectedUpdate, ValueError) and issubclass(RejectedUpdate, MeshdError)


def test_bad_training_delta_rejected() -> None:
    node = PushSum(torch.zeros(3, dtype=torch.float64))
    before = _snapshot(node)
    for delta in (torch.tensor([0.0, float("nan"), 0.0]).double(), torch.zeros(4).double(), torch.zeros(3).long()):
        with pytest.raises(RejectedUpdate) as err:
            node.apply_update(delta)
        assert err.value.reason == "bad_update"
    assert _snapshot(node) == before


def test_max_abs_and_max_weight_are_configurable() -> None:
    node = PushSum(torch.zeros(2, dtype=torch.float64), max_abs=10.0, max_weight=2.0)
    node.merge(torch.tensor([10.0, -10.0], dtype=torch.float64), 2.0, 0)
    with pytest.raises(RejectedUpdate):
        node.merge(torch.tensor([10.5, 0.0], dtype=torch.float64), 1.0, 0)
    with pytest.raises(RejectedUpdate):
        node.merge(torch.zeros(2, dtype=torch.float64), 2.5, 0)


# -- training (SGP) --------------------------------------------------------------------------------


def test_sgp_quadratic_nodes_approach_mean_of_targets() -> None:
    """Node i minimizes ||x - c_i||^2 with a few local steps between exchanges: all reach mean(c)."""
    n, dim, lr, steps = 16, 20, 0.01, 3
    gen = torch.Generator().manual_seed(10)
    targets = torch.randn(n, dim, generator=gen, dtype=torch.float64) * 3
    optimum = targets.mean(dim=0)
    spread = float((targets - optimum).norm(dim=1).mean())  # local-only training ends this far away
    nodes = [PushSum(torch.randn(dim, generator=gen, dtype=torch.float64), codec="f32") for _ in range(n)]
    rng = random.Random(10)
    for _ in range(150):
        for node, target in zip(nodes, targets, strict=True):
            z = node.estimate()
            x = z.clone()  # the caller trains a copy
            for _ in range(steps):
                x -= lr * 2 * (x - target)
            node.apply_update(x - z)
        gossip_round(nodes, rng)
    for _ in range(40):  # training off: settle consensus
        gossip_round(nodes, rng)
    errors = [float((node.estimate() - optimum).norm()) / spread for node in nodes]
    print(f"SGP quadratic: max error {max(errors):.2e} of the spread of the local optima")
    assert max(errors) < 0.1
    assert all(node.version == 150 for node in nodes)


def test_apply_update_moves_estimate_by_delta_and_keeps_merges() -> None:
    node = PushSum(torch.zeros(2, dtype=torch.float64), codec="f64")
    start = node.estimate()
    node.merge(torch.tensor([2.0, 2.0], dtype=torch.float64), 1.0, 0)  # during training
    node.apply_update(torch.tensor([0.5, -0.5], dtype=torch.float64))
    assert torch.allclose(node.estimate(), torch.tensor([1.5, 0.5], dtype=torch.float64))
    assert torch.equal(start, torch.zeros(2, dtype=torch.float64))  # estimate() is a copy
    assert node.version == 1


# -- pull, version, checkpoints ----------------------------------------------------------------------


def test_pull_split_and_adopt_conserve_mesh_mass() -> None:
    nodes, mean = make_nodes(8, seed=11)
    rng = random.Random(11)
    for _ in range(3):
        gossip_round(nodes, rng)
    s0, w0 = mass(nodes)
    responder = nodes[2]
    responder.apply_update(torch.zeros(DIM, dtype=torch.float64))  # version 1
    fresh = PushSum(torch.randn(DIM, dtype=torch.float64) * 100, codec="f64")  # random init: discarded
    share = responder.split_for_pull()
    assert responder.pending == 0  # subtracted at once
    fresh.adopt(share.values, share.weight, share.version)
    assert fresh.version == 1
    assert torch.allclose(fresh.estimate(), share.values)
    s, w = mass([*nodes, fresh])
    assert w == pytest.approx(w0, rel=1e-15)
    assert torch.allclose(s, s0, rtol=0, atol=1e-12)
    # A straggler that has state merges instead; mass still conserved.
    straggler = nodes[5]
    share2 = nodes[0].split_for_pull()
    straggler.merge(share2.values, share2.weight, share2.version)
    s, w = mass([*nodes, fresh])
    assert w == pytest.approx(w0, rel=1e-15)
    assert torch.allclose(s, s0, rtol=0, atol=1e-12)
    everyone = [*nodes, fresh]
    for _ in range(80):
        gossip_round(everyone, rng)
    assert max_distance(everyone, mean) <= 1e-6  # the newcomer did not bias the mean


def test_split_for_pull_respects_pending_shares() -> None:
    node = PushSum(torch.ones(2, dtype=torch.float64))
    (share,) = node.prepare(1)
    pulled = node.split_for_pull()
    assert pulled.weight == 0.25 and node.weight == 0.75
    assert node.confirm(share.id)
    assert node.weight == 0.25


def test_adopt_refused_with_pending_shares() -> None:
    node = PushSum(torch.ones(2, dtype=torch.float64))
    node.prepare(1)
    with pytest.raises(RejectedUpdate) as err:
        node.adopt(torch.ones(2, dtype=torch.float64), 0.5, 0)
    assert err.value.reason == "pending_shares"


def test_version_rules() -> None:
    node = PushSum(torch.zeros(2, dtype=torch.float64), version=5)
    node.apply_update(torch.zeros(2, dtype=torch.float64))
    assert node.version == 6
    node.merge(torch.zeros(2, dtype=torch.float64), 0.5, 3)
    assert node.version == 6
    node.merge(torch.zeros(2, dtype=torch.float64), 0.5, 40)
    assert node.version == 40 and node.merges == 2
    assert node.is_far_behind(51, threshold=10)
    assert not node.is_far_behind(50, threshold=10)
    assert not node.is_far_behind(2, threshold=10)


def test_a_merge_cannot_fast_forward_the_version_and_updates_saturate() -> None:
    node = PushSum(torch.zeros(2, dtype=torch.float64), version=10)
    node.merge(torch.zeros(2, dtype=torch.float64), 0.5, MAX_VERSION)  # a hostile (or far-ahead) peer
    assert node.version == 10 + MAX_VERSION_STEP
    node = PushSum(torch.zeros(2, dtype=torch.float64), version=MAX_VERSION)
    node.apply_update(torch.zeros(2, dtype=torch.float64))
    assert node.version == MAX_VERSION  # saturates: every encoder downstream stays in range


def test_consensus_distance_and_running_mean() -> None:
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert consensus_distance(a, a) == 0.0
    assert consensus_distance(torch.zeros(2, dtype=torch.float64), a) == pytest.approx(1.0)
    assert consensus_distance(a, torch.zeros(2, dtype=torch.float64)) == pytest.approx(5.0 / 1e-12)
    node = PushSum(torch.zeros(2, dtype=torch.float64), codec="f64")
    assert node.mean_distance is None
    d = node.merge(a, 1.0, 0)  # own model 0 vs incoming a
    assert d == pytest.approx(1.0) and node.mean_distance == pytest.approx(1.0)
    for _ in range(DISTANCE_WINDOW):
        node.merge(node.estimate(), 1.0, 0)
    assert node.mean_distance == pytest.approx(0.0, abs=1e-15)  # the window forgot the first one


def test_state_round_trip_is_bit_exact() -> None:
    nodes, _ = make_nodes(4, seed=12, codec="f32")
    rng = random.Random(12)
    for _ in range(5):
        gossip_round(nodes, rng)
    node = nodes[0]
    node.apply_update(torch.full((DIM,), 0.01, dtype=torch.float64))
    state = node.state()
    restored = PushSum.from_state(state, codec="f32")
    assert torch.equal(restored.numerator(), node.numerator())
    assert restored.weight == node.weight and restored.version == node.version == 1
    assert torch.equal(restored.estimate(), node.estimate())
    state.numerator.add_(1)  # state() is a copy
    assert not torch.equal(state.numerator, node.numerator())
    with pytest.raises(RejectedUpdate):
        PushSum.from_state(PushSumState(torch.zeros(3, dtype=torch.float64), 0.0, 0))
    with pytest.raises(RejectedUpdate):
        PushSum.from_state(PushSumState(torch.tensor([float("nan")], dtype=torch.float64), 1.0, 0))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        PushSum(torch.zeros(2, dtype=torch.float64), codec="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PushSum(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(RejectedUpdate):
        PushSum(torch.zeros(2, dtype=torch.float64), weight=0.0)
    node = PushSum(torch.zeros(2, dtype=torch.float32))  # float32 models are accepted and widened
    assert node.estimate().dtype == torch.float64 and node.dim == 2


# -- data weighting --------------------------------------------------------------------------------------


def test_mean_rows_is_estimated_by_push_sum_with_exact_mass() -> None:
    rows = [60.0, 238.0, 772.0, 4462.0, 1000.0, 3.0, 0.0, 9180.0]
    nodes = [PushSum(torch.zeros(4, dtype=torch.float64), rows=r) for r in rows]
    rng = random.Random(3)
    for _ in range(60):
        for i, node in enumerate(nodes):
            j = rng.choice([k for k in range(len(nodes)) if k != i])
            (share,) = node.prepare(1)
            if rng.random() < 0.2:  # lost: nothing moves
                node.abandon(share.id)
                continue
            nodes[j].merge(share.values, share.weight, share.version, share.rows)
            node.confirm(share.id)
        total_r = math.fsum(n.mean_rows * n.weight for n in nodes)
        assert total_r == pytest.approx(sum(rows), rel=1e-12)  # no rows mass lost or created
    mean = sum(rows) / len(rows)
    assert all(n.mean_rows == pytest.approx(mean, rel=1e-6) for n in nodes)
    assert data_scale(rows[3], nodes[3].mean_rows) == pytest.approx(rows[3] / mean, rel=1e-6)


def test_data_scale_is_clamped_and_neutral_without_an_estimate() -> None:
    assert data_scale(100.0, 100.0) == 1.0
    assert data_scale(1e9, 1.0) == 64.0 and data_scale(1.0, 1e9) == 1.0 / 64
    assert data_scale(0.0, 100.0) == 1.0 and data_scale(100.0, 0.0) == 1.0 and data_scale(math.nan, 1.0) == 1.0


def test_apply_update_scales_the_step_and_refuses_a_bad_scale() -> None:
    node = PushSum(torch.zeros(3, dtype=torch.float64), 2.0)
    node.apply_update(torch.ones(3, dtype=torch.float64), 0.5)
    assert torch.equal(node.estimate(), torch.full((3,), 0.5, dtype=torch.float64))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RejectedUpdate, match="scale"):
            node.apply_update(torch.ones(3, dtype=torch.float64), bad)
    assert torch.equal(node.estimate(), torch.full((3,), 0.5, dtype=torch.float64))


def test_bad_rows_are_refused_and_change_nothing() -> None:
    node = PushSum(torch.zeros(3, dtype=torch.float64), rows=10.0)
    for bad in (-1.0, math.inf, math.nan, 1e13, "3"):
        with pytest.raises(RejectedUpdate):
            node.merge(torch.ones(3, dtype=torch.float64), 0.5, 0, bad)  # type: ignore[arg-type]
    assert node.weight == 1.0 and node.mean_rows == 10.0 and node.merges == 0


def test_adopt_keeping_own_weight_counts_every_domain_once() -> None:
    old = PushSum(torch.ones(3, dtype=torch.float64), 1.0, 7, rows=100.0)
    new = PushSum(torch.zeros(3, dtype=torch.float64), 1.0, 0, rows=20.0)
    share = old.split_for_pull()
    new.adopt(share.values, share.weight, share.version, share.rows, keep_own_weight=True)
    assert old.weight + new.weight == 2.0  # two domains, weight 2: the mesh's total still counts both
    assert torch.equal(new.estimate(), torch.ones(3, dtype=torch.float64))  # the mesh's model, not its own init
    assert old.mean_rows * old.weight + new.mean_rows * new.weight == pytest.approx(120.0)
    assert new.version == 7


def test_rows_numerator_survives_a_checkpoint() -> None:
    node = PushSum(torch.ones(3, dtype=torch.float64), 1.0, rows=42.0)
    node.inject_rows(8.0)
    back = PushSum.from_state(node.state())
    assert back.mean_rows == 50.0 and back.weight == 1.0


def test_served_ema_blends_peers_models_and_converges_with_the_estimate() -> None:
    served = ServedModel(window=3, kind="ema")
    own = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(served.value(own), own)  # nothing received yet: the estimate itself
    served.observe(torch.tensor([4.0, 8.0], dtype=torch.float64))
    assert torch.equal(served.value(own), torch.tensor([3.0, 6.0], dtype=torch.float64))  # (0 + 3 * 4) / 4
    for _ in range(200):
        served.observe(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(served.value(torch.ones(2, dtype=torch.float64)), torch.ones(2, dtype=torch.float64))
    off = ServedModel(window=0)
    off.observe(torch.ones(2, dtype=torch.float64), b"a")
    assert torch.equal(off.value(own), own)


def _v(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_served_peers_is_the_mean_of_the_estimate_and_each_peers_latest_model() -> None:
    served = ServedModel(window=2)  # "peers", the default kind
    own = _v(0.0, 0.0)
    assert torch.equal(served.value(own), own)  # nothing received yet: the estimate itself
    served.observe(_v(3.0, 3.0), b"a", now=0.0)
    for _ in range(10):  # a peer that sends often still counts once: its latest model
        served.observe(_v(6.0, 0.0), b"b", now=1.0)
    assert torch.equal(served.value(own, now=1.0), _v(3.0, 1.0))  # (0 + 3 + 6) / 3, (0 + 3 + 0) / 3
    served.observe(_v(0.0, 9.0), b"c", now=2.0)  # a third peer: the least recently heard (a) leaves the window
    assert torch.equal(served.value(own, now=2.0), _v(2.0, 3.0))  # (0 + 6 + 0) / 3, (0 + 0 + 9) / 3
    assert torch.equal(served.value(own, now=61.5), _v(0.0, 4.5))  # b silent for 60.5 s: (0 + c) / 2
    assert torch.equal(served.value(own, now=1000.0), own)  # every peer silent: the estimate itself


def test_served_peers_smooths_each_peers_models_in_time() -> None:
    served = ServedModel(window=4, smooth_s=1.0)
    own = _v(0.0)
    served.observe(_v(8.0), b"a", now=0.0)  # a peer's first model is its entry
    assert torch.equal(served.value(own, now=0.0), _v(4.0))  # (0 + 8) / 2
    served.observe(_v(0.0), b"a", now=math.log(2.0))  # ln 2 s later: the entry moves halfway, to 4
    assert torch.allclose(served.value(own, now=1.0), _v(2.0))
    served.observe(_v(0.0), b"a", now=100.0)  # heard after a long silence: its latest model
    assert torch.allclose(served.value(own, now=100.0), _v(0.0), atol=1e-12)
    with pytest.raises(ValueError, match="smooth_s"):
        ServedModel(window=4, smooth_s=-1.0)


def test_served_model_reconfigured_by_a_reload_applies_in_place() -> None:
    served = ServedModel(window=3)
    own = _v(0.0)
    for i, peer in enumerate((b"a", b"b", b"c")):
        served.observe(_v(3.0 * (i + 1)), peer, now=float(i))  # a 3, b 6, c 9
    assert not served.reconfigure(3, "peers", 0.0)  # nothing changed
    assert torch.equal(served.value(own, now=3.0), _v(4.5))  # (0 + 3 + 6 + 9) / 4
    assert served.reconfigure(1, "peers", 0.0)  # a smaller window drops the peers heard longest ago
    assert served.window == 1 and torch.equal(served.value(own, now=3.0), _v(4.5))  # (0 + 9) / 2
    assert served.reconfigure(1, "peers", 2.0)
    served.observe(_v(1.0), b"c", now=2.0 + 2.0 * math.log(2.0))  # the new time constant: halfway, 9 -> 5
    assert torch.allclose(served.value(own, now=5.0), _v(2.5))
    assert served.reconfigure(4, "ema", 2.0) and served.kind == "ema"  # a new kind starts from nothing
    assert torch.equal(served.value(own), own)
    with pytest.raises(ValueError, match="kind"):
        served.reconfigure(4, "median", 2.0)
    assert served.kind == "ema" and served.window == 4  # a refused value changes nothing


def test_served_peers_drops_the_model_restored_from_a_checkpoint_once_peers_are_heard() -> None:
    served = ServedModel(window=16)
    served.observe(_v(8.0), now=0.0)  # what the checkpoint served (peer b"")
    own = _v(2.0)
    assert torch.equal(served.value(own, now=5.0), _v(5.0))  # not dropped for its age: no peer is heard yet
    for i, x in enumerate((1.0, 2.0, 3.0)):
        served.observe(_v(x), bytes([i + 1]), now=10.0)
    assert torch.equal(served.value(own, now=10.0), _v(2.0))  # (2 + 1 + 2 + 3) / 4: the restored one is gone
    served.reset()
    assert torch.equal(served.value(own), own)


def test_served_model_serves_the_settled_estimate_until_training_stops() -> None:
    served = ServedModel(window=3, kind="ema")
    served.observe(torch.tensor([4.0, 8.0], dtype=torch.float64))
    settled = torch.tensor([1.0, 2.0], dtype=torch.float64)
    served.settle(settled)
    settled.add_(100.0)  # the caller's tensor is copied, not kept
    drifted = torch.tensor([9.0, 9.0], dtype=torch.float64)  # the estimate moved on (training, merges)
    assert served.settled
    assert torch.equal(served.value(drifted), torch.tensor([1.0, 2.0], dtype=torch.float64))
    served.unsettle()  # training stopped: the blend of the converging estimate again
    assert not served.settled
    assert torch.equal(served.value(drifted), (drifted + 3 * torch.tensor([4.0, 8.0], dtype=torch.float64)) / 4)
    served.settle(torch.ones(3, dtype=torch.float64))  # another length (a new model): ignored, never served
    assert torch.equal(served.value(drifted), (drifted + 3 * torch.tensor([4.0, 8.0], dtype=torch.float64)) / 4)
    served.reset()
    assert not served.settled and torch.equal(served.value(drifted), drifted)


def test_prepare_at_most_caps_the_share_weight_and_keeps_the_model() -> None:
    ps = PushSum(torch.tensor([1.0, 2.0], dtype=torch.float64), weight=1.0)
    [share] = ps.prepare(1, at_most=1e-6)  # a push-pull answer to a tiny share
    assert share.weight == pytest.approx(1e-6)
    assert ps.confirm(share.id) and ps.weight == pytest.approx(1.0 - 1e-6)
    assert torch.allclose(ps.estimate(), torch.tensor([1.0, 2.0], dtype=torch.float64))
    [share] = ps.prepare(1, at_most=5.0)  # above half the free weight: half, as without a cap
    assert share.weight == pytest.approx(ps.weight / 2)


def test_pull_answers_give_a_bounded_fraction_and_stop_at_the_floor() -> None:
    """Issue #10 item 2: 1,074 pulls took a weight from 0.41 to 5e-324 and moved the model by 0.24. Now an
    answer carries ``fraction`` of the free weight and none is given below the floor: the model stays put."""
    z = torch.tensor([0.123456789, -7.5, 3.0e-3], dtype=torch.float64)
    ps = PushSum(z, weight=0.41, codec="f64")
    answered = []
    for _ in range(2000):
        share = ps.split_for_pull(0.25, 0.1)
        if share is None:
            break
        assert share.weight > 0 and share.weight == pytest.approx((share.weight + ps.weight) * 0.25)
        answered.append(share)
    assert len(answered) == 4  # 0.41 * 0.75**5 = 0.097 < 0.1: the fifth is refused
    assert 0.1 <= ps.weight < 0.1 / 0.75
    left = ps.weight
    assert ps.split_for_pull(0.25, 0.1) is None and ps.weight == left  # refused: nothing changed
    assert torch.allclose(ps.estimate(), z, rtol=1e-12, atol=0.0)
    with pytest.raises(ValueError, match="fraction"):
        ps.split_for_pull(0.75)
    # Without a floor a share too light to carry anything is refused too (never a weight-0 answer).
    tiny = PushSum(z, weight=1e-300)
    assert tiny.split_for_pull(0.5, 0.0) is None and tiny.weight == 1e-300


def test_pushpull_answer_keeps_the_floor() -> None:
    ps = PushSum(torch.tensor([1.0, 2.0], dtype=torch.float64), weight=0.15)
    assert ps.prepare(1, at_most=1.0, keep=0.1) == []  # half of 0.15 would leave 0.075
    [share] = ps.prepare(1, at_most=0.04, keep=0.1)  # a lighter answer leaves 0.11: given
    assert share.weight == pytest.approx(0.04) and ps.pending == 1
