"""Merge rules (meshd/core/merge.py): plain push-sum and the clipped, poisoning-robust rule, in-process."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.core.averaging import PushSum, RejectedUpdate
from meshd.core.merge import QUARANTINE_RATIO, ClippedRule, PushSumRule, RuleParams, make_rule

A, B, C, H = b"a" * 32, b"b" * 32, b"c" * 32, b"h" * 32


def _vec(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _warm(rule: ClippedRule, ps: PushSum, now: float = 0.0) -> None:
    """Three honest peers at distance 0.1 give the rule a radius of clip_factor * 0.1 (calibration: refused)."""
    for peer in (A, B, C):
        with pytest.raises(RejectedUpdate, match="calibrating"):
            rule.merge(ps, peer, ps.estimate() + _vec(0.1, 0.0), 1e-6, ps.version, None, now)
    assert ps.merges == 0


def test_make_rule_names_and_refuses_unknown() -> None:
    assert make_rule("pushsum").name == "pushsum"
    assert make_rule("clipped").name == "clipped"
    with pytest.raises(ValueError, match="pushsum, clipped"):
        make_rule("krum")


def test_pushsum_rule_is_plain_merge_and_accounts() -> None:
    ps, ref = PushSum(_vec(0.0, 0.0)), PushSum(_vec(0.0, 0.0))
    rule = PushSumRule()
    out = rule.merge(ps, A, _vec(1e3, -1e3), 0.5, 7, None, 0.0)
    ref.merge(_vec(1e3, -1e3), 0.5, 7)
    assert torch.equal(ps.numerator(), ref.numerator()) and ps.weight == ref.weight and ps.version == 7
    assert out.scale == 1.0
    rule.refused(A, "bad_values", 1.0)
    snap = rule.snapshot(1.0)[A]
    assert snap["merged"] == 1 and snap["refused"] == {"bad_values": 1} and snap["quarantined"] is False


def test_clipped_rule_calibrates_on_min_peers_and_hostile_first_speakers_do_not_set_the_radius() -> None:
    ps = PushSum(_vec(3.0, 4.0))
    rule = ClippedRule(RuleParams(clip_factor=2.0, min_peers=3))
    assert rule.radius(ps, 0.0) is None
    for peer in (H, B):  # two hostile peers speak first, from far away
        with pytest.raises(RejectedUpdate, match="calibrating"):
            rule.merge(ps, peer, _vec(3e3, 4e3), 0.5, 0, None, 0.0)
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule.merge(ps, A, ps.estimate() + _vec(0.1, 0.0), 0.5, 0, None, 0.0)
    assert ps.merges == 0 and ps.weight == 1.0  # nothing merged while calibrating
    tau = rule.radius(ps, 0.0)
    assert tau is not None and math.isclose(tau, 0.2, rel_tol=1e-6)  # the lower third: the honest peer's
    ps2 = PushSum(_vec(3.0, 4.0))
    rule2 = ClippedRule(RuleParams(min_peers=1))  # a mesh of two: the first share calibrates
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule2.merge(ps2, A, _vec(3.0, 4.5), 0.5, 0, None, 0.0)
    assert rule2.merge(ps2, A, _vec(3.0, 4.5), 0.5, 0, None, 0.0).scale == 1.0


def test_a_scaled_model_moves_the_local_model_by_at_most_the_radius() -> None:
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(clip_factor=2.0, quarantine_after=4))
    _warm(rule, ps)
    before = ps.estimate()
    with pytest.raises(RejectedUpdate, match="far_off"):  # far beyond the radius: refused
        rule.merge(ps, H, before * 1e3, ps.weight, ps.version, None, 0.0)
    assert torch.equal(ps.estimate(), before)
    out = rule.merge(ps, H, before + _vec(0.0, 0.24), ps.weight, ps.version, None, 0.0)  # within 1.25 tau: clipped
    tau = 0.2
    assert out.scale == pytest.approx(0.2 / 0.24)
    assert float(torch.linalg.vector_norm(out.values - before)) == pytest.approx(tau, rel=1e-6)
    assert float(torch.linalg.vector_norm(ps.estimate() - before)) <= tau
    assert rule.snapshot(0.0)[H]["clipped"] == 1


def test_an_honest_share_within_the_radius_is_merged_exactly() -> None:
    ps, ref = PushSum(_vec(1.0, 1.0)), PushSum(_vec(1.0, 1.0))
    rule = ClippedRule()
    _warm(rule, ps)
    for _ in range(4):
        ref.merge(ref.estimate() + _vec(0.1, 0.0), 1e-6, 0)
    v = ps.estimate() + _vec(0.0, 0.15)
    ref.merge(v, 0.3, 0)
    out = rule.merge(ps, C, v, 0.3, 0, None, 0.0)
    assert out.scale == 1.0 and out.weight == 0.3
    assert torch.allclose(ps.estimate(), ref.estimate(), atol=1e-12)


def test_one_peer_cannot_merge_more_than_its_shares_per_round() -> None:
    ps = PushSum(_vec(0.0))
    rule = ClippedRule(RuleParams(max_peer_shares=1.0, weight_ceiling=1e9, min_peers=1))
    # Identical models need no calibration: merged whole (RADIUS_FLOOR).
    merged = 0
    with pytest.raises(RejectedUpdate, match="peer_budget"):
        for _ in range(10):  # a flood in one round
            rule.merge(ps, H, _vec(0.0), 0.5, 0, None, 0.0)
            merged += 1
    assert merged == 2  # two rounds' worth, then refused (the sender keeps the mass)
    assert ps.weight == pytest.approx(2.0)  # each merged whole: no mass cut away
    ps.prepare(1)  # a local gossip round refills the bucket by one share
    rule.merge(ps, H, _vec(0.0), 0.5, 0, None, 0.0)
    with pytest.raises(RejectedUpdate, match="peer_budget"):
        rule.merge(ps, H, _vec(0.0), 0.5, 0, None, 0.0)


def test_weight_inflation_is_capped_by_the_ceiling_and_leaves_the_model() -> None:
    ps = PushSum(_vec(2.0, -1.0))
    rule = ClippedRule(RuleParams(weight_ceiling=3.0, min_peers=1))
    for _ in range(20):
        ps.prepare(1)
        rule.merge(ps, H, ps.estimate(), 9.0, 0, None, 0.0)
        assert ps.weight <= 3.0 + 1e-12
    assert torch.allclose(ps.estimate(), _vec(2.0, -1.0), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=3, max_size=3), st.floats(1.0, 50.0), st.floats(0.05, 0.9),
       st.floats(0.5, 1.0))
def test_limit_weight_keeps_the_model_after_pending_shares_leave(
    xs: list[float], weight: float, pend_frac: float, ceil_frac: float,
) -> None:
    ps, ref = PushSum(torch.tensor(xs, dtype=torch.float64), weight), PushSum(torch.tensor(xs, dtype=torch.float64),
                                                                             weight)
    share = ps.prepare(1)[0]
    ref_share = ref.prepare(1)[0]
    ps.merge(_vec(1.0, 2.0, 3.0), weight * pend_frac, 0)
    ref.merge(_vec(1.0, 2.0, 3.0), weight * pend_frac, 0)
    ceiling = share.weight + (ps.weight - share.weight) * ceil_frac
    ps.limit_weight(ceiling)
    assert ps.weight <= ceiling * (1 + 1e-12)
    ps.confirm(share.id)
    ref.confirm(ref_share.id)
    assert torch.allclose(ps.estimate(), ref.estimate(), rtol=1e-9, atol=1e-9)


def test_versions_rise_by_at_most_the_step_and_clipped_versions_are_not_believed() -> None:
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(max_version_step=16))
    _warm(rule, ps)
    out = rule.merge(ps, H, ps.estimate(), 0.1, 2**53, None, 0.0)
    assert ps.version == 16 and out.trusted_version
    out = rule.merge(ps, H, ps.estimate() + _vec(0.24, 0.0), 0.1, 2**53, None, 0.0)  # clipped
    # No further: the median of the peers' versions is still 0, and a merge never goes a step beyond it.
    assert ps.version == 16 and out.scale < 1.0 and not out.trusted_version


def test_rows_estimates_are_clamped_to_a_factor_of_64() -> None:
    ps = PushSum(_vec(0.0), rows=100.0)
    rule = ClippedRule(RuleParams(min_peers=1))
    rule.merge(ps, H, _vec(0.0), 1.0, 0, 1e12, 0.0)
    assert ps.mean_rows == pytest.approx(3250.0)  # (100 + 6400) / 2, not ~5e11


def test_an_answer_refused_for_a_reason_of_ours_keeps_its_weight_and_rows_not_its_model() -> None:
    ps = PushSum(_vec(1.0, 2.0), rows=100.0)
    rule = ClippedRule(RuleParams(weight_ceiling=1.75))
    rule.absorb(ps, 0.5, 1e12)
    assert torch.equal(ps.estimate(), _vec(1.0, 2.0))  # the model is unchanged
    assert ps.weight == pytest.approx(1.5) and ps.mean_rows == pytest.approx((100.0 + 0.5 * 6400.0) / 1.5)
    rule.absorb(ps, 0.5, None)
    assert ps.weight == pytest.approx(1.75)  # brought back to the ceiling


def test_identical_models_do_not_calibrate_the_radius_to_zero() -> None:
    """A mesh that gossips before it trains sends identical models: they merge whole and teach the radius
    nothing. (They used to calibrate it to 0, which stayed 0: every trained model was then struck or clipped
    to nothing, and 16 real daemons learned no better than alone.)"""
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(weight_ceiling=1e9))
    for _ in range(3):
        for peer in (A, B, C):
            ps.prepare(1)
            assert rule.merge(ps, peer, ps.estimate(), ps.weight, 0, None, 0.0).scale == 1.0
    assert rule.radius(ps, 0.0) is None and ps.merges == 9  # merged, but not calibrated by them
    for peer in (A, B, C):  # the first trained models calibrate it: 2 x 0.1
        with pytest.raises(RejectedUpdate, match="calibrating"):
            rule.merge(ps, peer, ps.estimate() + _vec(0.1, 0.0), 1e-6, 0, None, 0.0)
    assert rule.radius(ps, 0.0) == pytest.approx(0.2)
    out = rule.merge(ps, A, ps.estimate() + _vec(0.15, 0.0), 1e-6, 0, None, 0.0)
    assert out.scale == 1.0  # an honest distance is merged whole
    assert rule.radius(ps, 0.0) >= 1e-3 * float(torch.linalg.vector_norm(ps.estimate()))  # never below the floor


def test_quarantine_after_persistent_strikes_then_release_and_probation() -> None:
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(quarantine_after=3, quarantine_s=60.0))
    _warm(rule, ps)
    far = lambda: ps.estimate() + _vec(QUARANTINE_RATIO * 0.2 * 10, 0.0)  # noqa: E731
    before = ps.numerator()
    for t in (1.0, 2.0):
        with pytest.raises(RejectedUpdate, match="far_off"):  # a strike moves nothing
            rule.merge(ps, H, far(), 1e-6, 0, None, t)
    assert torch.equal(ps.numerator(), before)
    assert not rule.is_quarantined(H, 2.0) and rule.events() == []
    clipped = rule.merge(ps, A, ps.estimate() + _vec(0.24, 0.0), 1e-6, 0, None, 2.5)  # between tau and 1.25 tau
    assert 0.0 < clipped.scale < 1.0
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule.merge(ps, H, far(), 1e-6, 0, None, 3.0)
    assert rule.is_quarantined(H, 3.0) and rule.events() == [("quarantined", H)]
    with pytest.raises(RejectedUpdate, match="quarantined"):  # even a good share, while it lasts
        rule.merge(ps, H, ps.estimate(), 1e-6, 0, None, 30.0)
    assert rule.totals(30.0) == {"clipped": 1, "quarantines": 1, "quarantined": 1}
    assert rule.snapshot(30.0)[H]["quarantine_left_s"] == pytest.approx(33.0)
    rule.tick(63.0)
    assert rule.events() == [("released", H)] and not rule.is_quarantined(H, 63.0)
    rule.merge(ps, H, ps.estimate(), 1e-6, 0, None, 64.0)  # behaves: merged
    assert rule.snapshot(64.0)[H]["merged"] == 1
    rule.tick(200.0)
    assert rule.events() == []  # released once
    # A peer on probation that strikes once is quarantined again at once.
    rule2 = ClippedRule(RuleParams(quarantine_after=3, quarantine_s=60.0))
    ps2 = PushSum(_vec(1.0, 1.0))
    _warm(rule2, ps2)
    for t in (1.0, 2.0):
        with pytest.raises(RejectedUpdate, match="far_off"):
            rule2.merge(ps2, H, ps2.estimate() + _vec(40.0, 0.0), 1e-6, 0, None, t)
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule2.merge(ps2, H, ps2.estimate() + _vec(40.0, 0.0), 1e-6, 0, None, 3.0)
    rule2.tick(70.0)
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule2.merge(ps2, H, ps2.estimate() + _vec(40.0, 0.0), 1e-6, 0, None, 71.0)
    assert [e for e, _ in rule2.events()] == ["quarantined", "released", "quarantined"]


def test_shares_beyond_the_strike_distance_in_a_row_quarantine_the_peer() -> None:
    """A share beyond 1.25 x the radius is refused (``far_off``) and is a strike; ``quarantine_after`` of them in
    a row quarantine the peer. A share merely clipped (within 1.25 x) is merged and is no strike, and a share
    within the radius in between resets the count."""
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(quarantine_after=2, quarantine_s=60.0, max_peer_shares=100.0))
    _warm(rule, ps)  # radius 0.2
    inside, clipped, beyond = _vec(0.1, 0.0), _vec(0.0, 0.24), _vec(0.0, 0.26)
    with pytest.raises(RejectedUpdate, match="far_off"):
        rule.merge(ps, H, ps.estimate() + beyond, 1e-6, 0, None, 1.0)
    assert rule.merge(ps, H, ps.estimate() + inside, 1e-6, 0, None, 2.0).scale == 1.0
    with pytest.raises(RejectedUpdate, match="far_off"):
        rule.merge(ps, H, ps.estimate() + beyond, 1e-6, 0, None, 3.0)
    assert rule.merge(ps, A, ps.estimate() + clipped, 1e-6, 0, None, 3.5).scale < 1.0  # merged, no strike
    assert rule.merge(ps, A, ps.estimate() + clipped, 1e-6, 0, None, 3.6).scale < 1.0
    assert not rule.is_quarantined(H, 3.6) and not rule.is_quarantined(A, 3.6)
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule.merge(ps, H, ps.estimate() + beyond, 1e-6, 0, None, 4.0)
    assert rule.is_quarantined(H, 4.0) and rule.events() == [("quarantined", H)]


def test_far_shares_are_no_strike_while_strikes_are_off() -> None:
    """While a domain's data are standardised (``strikes=False``: nothing trains, models differ by the codec's
    rounding only) a far share is refused but counts no strike: no quarantine however many come."""
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(quarantine_after=2, quarantine_s=60.0, max_peer_shares=100.0, strikes=False))
    _warm(rule, ps)  # radius 0.2
    for k in range(5):
        with pytest.raises(RejectedUpdate, match="no strike"):
            rule.merge(ps, H, ps.estimate() + _vec(0.0, 0.26), 1e-6, 0, None, 1.0 + k)
    assert not rule.is_quarantined(H, 6.0) and rule.events() == []


def test_recalibrate_forgets_the_radius_and_the_distances() -> None:
    """When training starts on standardised data the radius is calibrated again, on trained models."""
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule(RuleParams(quarantine_after=2, quarantine_s=60.0, max_peer_shares=100.0))
    _warm(rule, ps)
    assert rule.radius(ps, 1.0) is not None
    rule.recalibrate()
    assert rule.radius(ps, 1.0) is None
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule.merge(ps, H, ps.estimate() + _vec(0.0, 5.0), 1e-6, 0, None, 1.0)  # no radius yet: no strike


def test_a_peer_taking_push_pull_shares_and_answering_none_is_quarantined() -> None:
    """A sink: it acknowledges shares (the sender gives their mass away) and never sends a share back."""
    rule = ClippedRule(RuleParams(quarantine_after=2, quarantine_s=60.0))
    rule.answered(H, False, 1.0)
    rule.answered(H, True, 2.0)  # an answer resets the count: an honest peer low on weight now and then
    rule.answered(H, False, 3.0)
    assert not rule.is_quarantined(H, 3.0)
    rule.answered(H, False, 4.0)
    assert rule.is_quarantined(H, 4.0) and rule.events() == [("quarantined", H)]
    assert rule.pull_refusal(H, 10.0) is None  # its pulls are answered, under the pull limits, so it can catch up
    rule.tick(64.0)
    assert not rule.is_quarantined(H, 64.0) and rule.events() == [("released", H)]
    assert not PushSumRule().is_quarantined(H, 0.0)  # plain push-sum keeps no such account
    plain = PushSumRule()
    plain.answered(H, False, 1.0)
    plain.answered(H, False, 2.0)
    assert not plain.is_quarantined(H, 2.0)


def test_in_a_push_pull_task_one_way_shares_count_once_the_peer_has_answered() -> None:
    """A sink sends one-way shares and answers none: they are refused (``unproven``, the sender keeps the mass)
    until one of its answers has been merged here. Push-pull shares and answers are merged meanwhile."""
    ps = PushSum(_vec(0.0, 0.0))
    rule = ClippedRule(RuleParams(require_answer=True, min_peers=1, max_peer_shares=100.0))
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 0.0)
    with pytest.raises(RejectedUpdate, match="unproven"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 1.0)
    assert ps.merges == 0
    rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 2.0, reciprocal=True)  # it asks for an answer: merged
    rule.answered(H, True, 3.0)  # one of its answers was merged here
    rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 4.0)
    assert ps.merges == 2
    one_way = ClippedRule(RuleParams(min_peers=1))  # a task that asks for no answers requires none
    with pytest.raises(RejectedUpdate, match="calibrating"):
        one_way.merge(ps, A, _vec(0.1, 0.0), 0.5, 0, None, 0.0)
    one_way.merge(ps, A, _vec(0.1, 0.0), 0.5, 0, None, 1.0)


def test_one_way_shares_beyond_the_answers_merged_are_refused_and_two_more_quarantine_the_peer() -> None:
    """An attacker that answers push-pull is proven by its first answer; its one-way shares are then merged one
    per answer merged here (honest push-pull peers send none), and the second one beyond that quarantines it."""
    ps = PushSum(_vec(0.0, 0.0))
    rule = ClippedRule(RuleParams(require_answer=True, min_peers=1, max_peer_shares=100.0, quarantine_s=60.0))
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 0.0)
    rule.answered(H, True, 1.0)
    rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 2.0)  # the answer's credit
    with pytest.raises(RejectedUpdate, match="beyond this peer's answers"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 3.0)
    rule.answered(H, True, 4.0)  # another answer: one more one-way share, and the overdraft is forgiven
    rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 5.0)
    with pytest.raises(RejectedUpdate, match="beyond this peer's answers"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 6.0)
    assert ps.merges == 2 and not rule.is_quarantined(H, 6.0)
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 7.0)
    assert rule.is_quarantined(H, 7.0) and rule.events() == [("quarantined", H)]
    rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 70.0, reciprocal=True)  # released: push-pull still merged
    assert rule.events() == [("released", H)]
    with pytest.raises(RejectedUpdate, match="quarantined"):  # on probation, one overdraft puts it back
        rule.merge(ps, H, _vec(0.1, 0.0), 0.5, 0, None, 71.0)


def test_a_node_dragged_away_clips_its_peers_far_shares_instead_of_quarantining_them() -> None:
    """When more than two thirds of the peers' latest shares are beyond the strike distance, this node is the one
    far off (an attack dragged it): far shares are merged clipped, and the honest peers are not quarantined.
    A far minority is struck as before."""
    ps = PushSum(_vec(0.0, 0.0))
    rule = ClippedRule(RuleParams(quarantine_after=2, max_peer_shares=100.0))
    _warm(rule, ps)  # A, B, C at 0.1: radius 0.2
    ps.apply_update(_vec(0.0, 1.0))  # this node is dragged 1.0 away from its peers
    home = _vec(0.1, 0.0)
    for peer in (A, B):  # the first two far shares: a minority of the peers' latest, strikes
        with pytest.raises(RejectedUpdate, match="far_off"):
            rule.merge(ps, peer, home, 1e-3, 0, None, 1.0)
    out = rule.merge(ps, C, home, 1e-3, 0, None, 2.0)  # now all three are far: this node is adrift
    assert out.scale < 1.0 and float(torch.linalg.vector_norm(out.values - _vec(0.0, 1.0))) == pytest.approx(0.2)
    rule.merge(ps, A, home, 1e-3, 0, None, 3.0)  # A's second far share in a row: merged, not a quarantine
    assert not any(rule.is_quarantined(p, 3.0) for p in (A, B, C)) and rule.snapshot(3.0)[A]["strikes"] == 0


def test_a_share_older_than_the_peers_last_or_far_behind_the_peers_is_refused_as_old_version() -> None:
    """Replaying an old model: refused once its version is ``stale_versions`` behind the median of the
    peers' versions, and a peer's version may never go back below the last one merged from it."""
    ps = PushSum(_vec(1.0, 1.0), version=100)
    rule = ClippedRule(RuleParams(stale_versions=16, min_peers=3, max_peer_shares=100.0))
    for peer in (A, B, C):  # calibration: the peers are at version 100
        with pytest.raises(RejectedUpdate, match="calibrating"):
            rule.merge(ps, peer, ps.estimate() + _vec(0.1, 0.0), 1e-6, 100, None, 0.0)
    assert rule.peers_version(0.0) == 100
    rule.merge(ps, A, ps.estimate(), 1e-6, 90, None, 1.0)  # a little behind: merged
    with pytest.raises(RejectedUpdate, match="old_version"):  # behind its own last merged share
        rule.merge(ps, A, ps.estimate(), 1e-6, 89, None, 2.0)
    with pytest.raises(RejectedUpdate, match="old_version"):  # 17 behind the peers' median
        rule.merge(ps, H, ps.estimate(), 1e-6, 83, None, 3.0)
    assert rule.snapshot(3.0)[H]["merged"] == 0
    rule.merge(ps, H, ps.estimate(), 1e-6, 84, None, 4.0)  # 16 behind: still merged
    # A minority lying high cannot move the median, so honest peers are not made to look old.
    for t in (5.0, 6.0):
        rule.merge(ps, H, ps.estimate(), 1e-6, 2**53, None, t)
    assert rule.peers_version(6.0) == 100 and ps.version <= 100 + 16


def test_a_heavy_share_moves_the_model_no_more_than_one_of_the_receivers_weight() -> None:
    """Weight inflation: a share at the accepted cap moves the model as a share of the receiver's own weight
    would (halfway to its values at most); its weight is merged whole (weight is conserved)."""
    ps = PushSum(_vec(0.0, 0.0), weight=0.5)
    rule = ClippedRule(RuleParams(max_share_weight=1.0, weight_ceiling=1e9, min_peers=1))
    with pytest.raises(RejectedUpdate, match="calibrating"):
        rule.merge(ps, H, _vec(0.1, 0.0), 7.0, 0, None, 0.0)
    out = rule.merge(ps, H, _vec(0.1, 0.0), 7.0, 0, None, 1.0)
    assert out.weight == 7.0 and ps.weight == pytest.approx(7.5) and not out.trusted_version
    assert torch.allclose(ps.estimate(), _vec(0.05, 0.0))  # halfway, not 7 / 7.5 of the way
    before = ps.estimate()
    light = rule.merge(ps, A, before + _vec(0.0, 0.1), 0.25, 0, None, 2.0)  # lighter than ours: as it came
    assert light.scale == 1.0 and torch.allclose(ps.estimate(), before + _vec(0.0, 0.1 * 0.25 / 7.75))


def test_a_malformed_share_is_refused_before_any_accounting() -> None:
    ps = PushSum(_vec(1.0, 1.0))
    rule = ClippedRule()
    with pytest.raises(RejectedUpdate, match="bad_values"):
        rule.merge(ps, H, _vec(float("nan"), 1.0), 0.1, 0, None, 0.0)
    assert H not in rule.snapshot(0.0)


def test_pulls_are_rate_limited_per_peer() -> None:
    rule = ClippedRule(RuleParams(pull_interval_s=5.0))
    assert rule.allow_pull(H, 0.0) and not rule.allow_pull(H, 4.9) and rule.allow_pull(A, 4.9)
    assert rule.allow_pull(H, 5.0)


@pytest.mark.parametrize("name", ["pushsum", "clipped"])
def test_every_rule_limits_pulls_per_peer_and_in_total(name: str) -> None:
    """Issue #10 item 2: plain push-sum answered every pull; now every rule limits them, with a reason."""
    rule = make_rule(name, RuleParams(pull_interval_s=5.0, max_pulls_per_min=3.0))
    assert rule.pull_refusal(H, 0.0) is None
    assert rule.pull_refusal(H, 4.9) == "pull_rate"  # per peer
    assert rule.pull_refusal(A, 4.9) is None and rule.pull_refusal(B, 4.9) is None
    assert rule.pull_refusal(C, 4.9) == "pull_budget"  # the bucket of 3 is empty: nobody else gets one
    # 3 a minute: 0.245 tokens were left at 4.9 s, a whole one is there 15.1 s later (a refusal takes none).
    assert rule.pull_refusal(C, 19.9) == "pull_budget"
    assert rule.pull_refusal(C, 20.1) is None
    assert rule.pull_refusal(C, 21.0) == "pull_rate"
    # Long idle: the bucket holds 3 at most, not what an hour would have added.
    assert all(rule.pull_refusal(p, 1000.0) is None for p in (A, B, H))
    assert rule.pull_refusal(C, 1000.0) == "pull_budget"
    assert make_rule(name, RuleParams(pull_interval_s=0.0)).pull_refusal(H, 0.0) is None


def test_quarantined_peers_pulls_are_answered_under_the_pull_limits() -> None:
    """A domain quarantined for lagging (or restored from an old backup) catches up by pulling; its pulls
    drain no more than anyone's: one per pull_interval_s."""
    rule = ClippedRule(RuleParams(quarantine_after=1, quarantine_s=60.0, pull_interval_s=5.0))
    ps = PushSum(_vec(0.0, 0.0))
    _warm(rule, ps)
    with pytest.raises(RejectedUpdate, match="quarantined"):
        rule.merge(ps, H, _vec(1e3, 0.0), 0.1, 0, None, 1.0)
    assert rule.is_quarantined(H, 2.0)
    assert rule.pull_refusal(H, 2.0) is None and rule.pull_refusal(H, 3.0) == "pull_rate"


# --- in-memory gossip ---------------------------------------------------------------------------------------


def _simulate(rule_name: str, n: int, hostile: set[int], rounds: int, seed: int = 1,
              attack: str = "scaled", rules_out: list[Any] | None = None) -> tuple[list[PushSum], torch.Tensor]:
    """Training off: ``n`` nodes gossip (fanout 1, random targets); hostile nodes send ``attack`` to everyone."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(8, generator=gen, dtype=torch.float64)  # one init, then some local steps each
    starts = [base + 0.1 * torch.randn(8, generator=gen, dtype=torch.float64) for _ in range(n)]
    honest = [i for i in range(n) if i not in hostile]
    exact = torch.stack([starts[i] for i in honest]).mean(0)
    nodes = [PushSum(starts[i]) for i in range(n)]
    rules = [make_rule(rule_name, RuleParams(weight_ceiling=float(n))) for _ in range(n)]
    if rules_out is not None:
        rules_out.extend(rules)
    ids = [bytes([i]) * 32 for i in range(n)]
    for r in range(rounds):
        now = float(r)
        for i in rng.sample(range(n), n):
            if i in hostile:
                for j in honest:
                    bad = nodes[j].estimate() * -1e3 if attack == "scaled" else nodes[j].estimate() * 0 + 50.0
                    with _refusals():
                        rules[j].merge(nodes[j], ids[i], bad, float(n), 10**6, None, now)
                continue
            j = rng.choice([k for k in range(n) if k != i])
            share = nodes[i].prepare(1)[0]
            if j in hostile:
                nodes[i].confirm(share.id)  # a hostile receiver acknowledges and keeps it
                continue
            try:
                rules[j].merge(nodes[j], ids[i], share.values, share.weight, share.version, share.rows, now)
            except RejectedUpdate:
                nodes[i].abandon(share.id)
            else:
                nodes[i].confirm(share.id)
    return [nodes[i] for i in honest], exact


class _refusals:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, ev: object, tb: object) -> bool:
        return et is RejectedUpdate


def _spread(models: list[torch.Tensor], centre: torch.Tensor) -> float:
    return max(float(torch.linalg.vector_norm(m - centre)) for m in models)


def test_clipped_gossip_reaches_consensus_near_the_exact_mean_without_attackers() -> None:
    exact_nodes, exact = _simulate("pushsum", 8, set(), 60)
    clipped_nodes, _ = _simulate("clipped", 8, set(), 60)
    start_spread = 0.1 * math.sqrt(8)  # starting models: one init plus N(0, 0.1^2 I_8) each
    assert _spread([p.estimate() for p in exact_nodes], exact) < 1e-6
    ests = [p.estimate() for p in clipped_nodes]
    consensus = torch.stack(ests).mean(0)
    assert _spread(ests, consensus) < 1e-3  # a consensus...
    assert float(torch.linalg.vector_norm(consensus - exact)) < 0.2 * start_spread  # ...near the exact mean


@pytest.mark.parametrize("attack", ["scaled", "constant"])
def test_two_hostile_of_eight_are_quarantined_and_honest_models_stay_near_consensus(attack: str) -> None:
    plain, exact = _simulate("pushsum", 8, {0, 1}, 40, attack=attack)
    assert _spread([p.estimate() for p in plain], exact) > 10  # the control: plain push-sum is wrecked
    rules: list[Any] = []
    robust, exact = _simulate("clipped", 8, {0, 1}, 40, attack=attack, rules_out=rules)
    ests = [p.estimate() for p in robust]
    for j in range(2, 8):  # every honest node has quarantined both hostile ones (and no honest one)
        assert rules[j].totals(39.0)["quarantines"] >= 2
        assert {p for p, a in rules[j].snapshot(39.0).items() if a["quarantines"]} == {bytes([0]) * 32, bytes([1]) * 32}
    assert all(bool(torch.isfinite(e).all()) for e in ests)
    assert _spread(ests, exact) < 0.1 * math.sqrt(8)  # within the starting spread of the honest mean
    assert all(p.weight <= 8.0 + 1e-9 for p in robust)
