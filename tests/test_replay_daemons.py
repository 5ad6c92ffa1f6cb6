"""Issue #10 item 3 against a real `meshd run` daemon: no envelope is accepted twice, whatever the number of senders.

Before the fix the receiver kept replay windows for at most 4,096 senders and dropped the least recently heard
one: after 4,097 other trusted senders were heard, an envelope it had refused as ``replayed`` was accepted
again (200) while its timestamp was still within the skew window, so a replayed share would have been merged
twice. Here 4,098 keys are trusted (a governance registry), sender 0's ping is accepted once and refused as
replayed, the 4,097 others each get a ping through, and sender 0's envelope is replayed again: still refused.
The skew window is widened to 15 minutes so the replay is inside it however slowly a loaded host sends the
pings (the loop is bounded in count and time; nothing asserts on speed).
"""

from __future__ import annotations

import time
from pathlib import Path

from meshd.ops.localmesh import get_status
from tests.helpers import TIMEOUT_SCALE
from tests.senders import ManySenders, error_of

OTHERS = 4097
SKEW_S = 900


def test_a_replay_stays_refused_after_4097_other_senders(tmp_path: Path) -> None:
    with ManySenders(OTHERS + 1, tmp_path / "replay", {("limits", "max_skew_s"): str(SKEW_S)}) as senders:
        envelope = senders.seal(0)
        sealed_at = time.time()
        assert senders.post(envelope)[0] == 200
        status, reply = senders.post(envelope)
        assert (status, error_of(reply)) == (409, "replayed")

        deadline = time.monotonic() + 240 * TIMEOUT_SCALE  # bounds the loop; not a speed requirement
        for i in range(1, OTHERS + 1):
            assert time.monotonic() < deadline, f"only {i - 1} of {OTHERS} senders heard in time"
            senders.ping(i)
        assert time.time() - sealed_at < SKEW_S - 60, "the replay below must be inside the skew window"

        status, reply = senders.post(envelope)
        assert status == 409 and error_of(reply) in ("replayed", "stale"), (status, reply[:300])
        senders.ping(0)  # the sender itself is not locked out: a fresh envelope passes
        s = get_status(senders.status_url, timeout=30.0)
        assert s is not None
        assert s["mesh"]["trusted"] == OTHERS + 1
        assert s["gossip"]["rejected"].get("replayed", 0) + s["gossip"]["rejected"].get("stale", 0) == 2
        assert s["gossip"]["received"] == OTHERS + 2
    log = senders.logs()
    assert "BlockingError" not in log and "request_failed" not in log
