"""meshd.core.cohort: who a task learns with, and what it knows of each peer (pure, fake clock)."""

from __future__ import annotations

from meshd.core.cohort import BLOCK_RETRY_S, Cohort, TaskPeers, paced_steps

A, B, C = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32


def test_cohort_by_domain_name_peer_id_or_everyone() -> None:
    assert Cohort(("*",)).admits(A, None)
    named = Cohort(("sales", B.hex()))
    assert named.admits(A, "sales")
    assert named.admits(B, "whatever")  # a peer id is admitted whatever domain it claims
    assert not named.admits(C, "support")
    assert not named.admits(C, None)
    assert named.describe() == ["sales", B.hex()]


def test_incompatibility_names_model_then_schema() -> None:
    peers = TaskPeers("fp", "schema")
    assert peers.incompatibility("fp", "schema") is None
    assert peers.incompatibility("other", "schema") == "incompatible"
    assert peers.incompatibility("fp", "other") == "schema_mismatch"
    assert peers.incompatibility(None, None) == "incompatible"


def test_advertised_mismatch_blocks_for_a_while_then_retries() -> None:
    peers = TaskPeers("fp", "schema")
    peers.advertised(A, True, "fp", "other", now=10.0)
    assert peers.is_blocked(A, 10.0 + BLOCK_RETRY_S - 1)
    assert not peers.is_blocked(A, 10.0 + BLOCK_RETRY_S)
    assert peers.snapshot()[A.hex()]["incompatible"] == "schema_mismatch"
    peers.advertised(A, True, "fp", "schema", now=11.0)  # fixed on its side
    assert not peers.is_blocked(A, 11.0)
    assert peers.snapshot()[A.hex()]["incompatible"] is None


def test_a_peer_not_running_the_task_is_blocked_as_unknown_task() -> None:
    peers = TaskPeers("fp", "schema")
    peers.advertised(B, False, None, None, now=0.0)
    assert peers.is_blocked(B, 1.0)
    assert peers.snapshot()[B.hex()] == {"runs": False, "fp": None, "schema": None, "incompatible": "unknown_task",
                                          "epochs": None}
    # A pong without a schema (a minimal client) is judged by its model alone.
    peers.advertised(C, True, "fp", None, now=0.0)
    assert not peers.is_blocked(C, 1.0)


def test_epochs_heard_within_horizon_and_among() -> None:
    peers = TaskPeers("fp", "schema")
    peers.heard_epochs(A, 2.0, 0.0)
    peers.heard_epochs(B, 3.0, 50.0)
    peers.heard_epochs(C, None, 50.0)  # stopped training: nobody waits for it
    assert peers.epochs_heard({A, B, C}, 60.0, 30.0) == [3.0]
    assert peers.epochs_heard({A}, 10.0, 30.0) == [2.0]
    peers.forget_except({B})
    assert peers.get(A) is None and peers.get(B) is not None


def test_pace_keeps_within_half_an_epoch_of_the_median() -> None:
    kw = {"slack": 0.5, "started": (0.0, 0.0), "now": 100.0, "listen_s": 3.0, "alone": False}
    # 10 steps per epoch, at epoch 2.0; peers at 1.0, 2.0 and 9.0 (median 2.0): up to 2.5, so 5 steps.
    assert paced_steps(8, 2.0, 10, [1.0, 2.0, 9.0], **kw) == 5
    assert paced_steps(8, 2.6, 10, [1.0, 2.0, 9.0], **kw) == 0  # ahead: waits
    assert paced_steps(8, 0.0, 10, [1.0, 2.0, 9.0], **kw) == 8  # behind: all it wanted


def test_pace_listens_for_peers_when_training_starts() -> None:
    kw = {"slack": 0.5, "listen_s": 3.0}
    # Just started at epoch 4.0 with alive peers, none heard: half an epoch, then it waits for them...
    assert paced_steps(8, 4.0, 10, [], started=(10.0, 4.0), now=10.0, alone=False, **kw) == 5
    assert paced_steps(8, 4.5, 10, [], started=(10.0, 4.0), now=12.9, alone=False, **kw) == 0
    # ...until listen_s passed (its peers do not train), or when it has no alive peer at all.
    assert paced_steps(8, 4.5, 10, [], started=(10.0, 4.0), now=13.0, alone=False, **kw) == 8
    assert paced_steps(8, 4.5, 10, [], started=(10.0, 4.0), now=10.0, alone=True, **kw) == 8
    # A peer heard meanwhile paces it as usual.
    assert paced_steps(8, 4.5, 10, [4.25], started=(10.0, 4.0), now=11.0, alone=False, **kw) == 3
