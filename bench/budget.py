"""Pre-authentication budgets: what hostile clients cost a real daemon (issue #10 items 5, 7, 8).

One `meshd run` daemon with the default limits (64 MiB messages, 128 MiB budget of unauthenticated bytes,
512 connections) and a trusted client, on loopback. Figures: the daemon's peak RSS growth (VmHWM, reset
before each attack) under 100 concurrent 60 MiB uploads, 4 gzip bombs and 8 chunked bodies over the limit;
trusted pings on fresh connections during a 2,000-connection flood; the event loop's lag (the daemon's own
figure and /healthz probed from outside) while it refuses a 60 MiB trusted body of nested ints.

Run: ``.venv/bin/python bench/budget.py [--out bench/results/budget.json]`` (about a minute; root, for
/proc/PID/clear_refs).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.*, when run as a script

import msgpack

from tests.budget_client import MIB, Peak, Upload, gzip_bomb, read_answer, stream
from tests.helpers import DaemonProc, init_domain, set_toml
from tests.test_wire_daemons import ENVELOPE_CT, Client, Node, connect, http_head, now_ms, post

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "budget.json"
BUDGET = 128 * MIB


def _ping_ms(b: Node, c: Client, source: str) -> float | None:
    t0 = time.perf_counter()
    try:
        answer = post(b.peer_port, c.seal(b.pk), source=source, timeout=30)
    except OSError:
        return None
    if answer.status != 200:
        return None
    c.open_pong(answer.body, b.pk)
    return round((time.perf_counter() - t0) * 1000, 2)


def uploads(b: Node, c: Client) -> dict[str, Any]:
    size, socks = 60 * MIB, []
    for i in range(100):
        s = connect(b.peer_port, f"127.0.5.{1 + i % 4}")
        s.sendall(http_head(size))
        socks.append(Upload(s, size))
    peak, pings = Peak(b.pid), []

    def ping_midway(sent: int) -> None:
        if not pings and sent > 2 * size:
            pings.append(_ping_ms(b, c, "127.0.6.1"))

    t0 = time.perf_counter()
    worst = stream(socks, limit_growth=3 * BUDGET, peak=peak, deadline_s=60, on_progress=ping_midway)
    return {"uploads": 100, "upload_mib": 60, "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_growth_mib": round(worst / MIB, 1), "answers": _tally(socks),
            "trusted_ping_during_ms": pings[0] if pings else None}


def gzip_bombs(b: Node) -> dict[str, Any]:
    bomb = gzip_bomb(256 * MIB)
    peak, socks = Peak(b.pid), []
    for i in range(4):
        s = connect(b.peer_port, f"127.0.5.{10 + i}")
        s.sendall(http_head(len(bomb)).replace(b"\r\n\r\n", b"\r\nContent-Encoding: gzip\r\n\r\n") + bomb)
        socks.append(s)
    answers = Counter(" ".join(read_answer(s) or ("closed",)) for s in socks)
    for s in socks:
        s.close()
    return {"bombs": 4, "gzip_kib": round(len(bomb) / 1024), "inflated_mib": 256, "answers": dict(answers),
            "peak_rss_growth_mib": round(peak.growth() / MIB, 1)}


def chunked(b: Node) -> dict[str, Any]:
    socks = []
    for i in range(8):
        s = connect(b.peer_port, f"127.0.5.{20 + i}")
        s.sendall(f"POST /v1/envelope HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ENVELOPE_CT}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        socks.append(Upload(s, 65 * MIB, chunked=True))
    peak = Peak(b.pid)
    worst = stream(socks, limit_growth=3 * BUDGET, peak=peak, deadline_s=60)
    return {"bodies": 8, "body_mib": 65, "peak_rss_growth_mib": round(worst / MIB, 1), "answers": _tally(socks)}


def flood(b: Node, c: Client) -> dict[str, Any]:
    kept = http.client.HTTPConnection("127.0.0.1", b.peer_port, timeout=30, source_address=("127.0.0.9", 0))
    held = []
    try:
        kept.request("POST", "/v1/envelope", body=c.seal(b.pk), headers={"Content-Type": ENVELOPE_CT})
        kept.getresponse().read()
        local = kept.sock.getsockname()
        t0, kept_ok = time.perf_counter(), True
        for wave in range(8):  # the keep-alive connection is used between waves (aiohttp closes it after 15 s idle)
            for i in range(250 * wave, 250 * (wave + 1)):
                held.append(connect(b.peer_port, f"127.0.7.{1 + i % 40}"))
            kept.request("POST", "/v1/envelope", body=c.seal(b.pk), headers={"Content-Type": ENVELOPE_CT})
            resp = kept.getresponse()
            resp.read()
            kept_ok = kept_ok and resp.status == 200 and kept.sock.getsockname() == local
        opened_s = time.perf_counter() - t0
        pings = [_ping_ms(b, c, f"127.0.8.{1 + i}") for i in range(50)]
        ok = [p for p in pings if p is not None]
    finally:
        kept.close()
        for s in held:
            s.close()
    return {"flood_connections": 2000, "addresses": 40, "flood_open_s": round(opened_s, 2),
            "trusted_new_connections": len(pings), "trusted_succeeded": len(ok),
            "trusted_ping_ms_median": round(statistics.median(ok), 2) if ok else None,
            "trusted_ping_ms_max": round(max(ok), 2) if ok else None, "trusted_keepalive_kept": kept_ok}


def hostile_body(b: Node, c: Client) -> dict[str, Any]:
    plaintext = msgpack.packb({"task": "default", "x": [[0] * 65536] * 960}, use_bin_type=True)
    envelope = c.wire.seal(b.pk, "share", plaintext, next(c.seqs), now_ms())
    stop, gaps = threading.Event(), [0.0]

    def probe() -> None:
        last = time.monotonic()
        while not stop.wait(0.05):
            with urllib.request.urlopen(b.proc.url + "/healthz", timeout=120) as resp:
                resp.read()
            now = time.monotonic()
            gaps.append(now - last - 0.05)
            last = now

    t = threading.Thread(target=probe, name="healthz-probe")
    t.start()
    try:
        t0 = time.perf_counter()
        answer = post(b.peer_port, envelope, source="127.0.6.5", timeout=180)
        took = time.perf_counter() - t0
    finally:
        stop.set()
        t.join()
    return {"body_mib": round(len(plaintext) / MIB, 1), "answer": f"{answer.status} {answer.error}",
            "answer_s": round(took, 2), "daemon_max_loop_lag_s": b.status()["loop"]["max_lag_s"],
            "healthz_max_gap_s": round(max(gaps), 3)}


def _tally(socks: list[Upload]) -> dict[str, int]:
    return dict(Counter(" ".join(u.answer or ("none",)).strip() for u in socks))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="meshd-budget-"))
    cfg, b_id, b_peer, b_status = init_domain(root / "b", "beta")
    c = Client()
    set_toml(cfg, "trust", "peers", f'["{c.ident.peer_id}"]')
    b = Node(DaemonProc(cfg, b_status), cfg, b_id, b_peer, b_status)
    try:
        b.proc.wait_ready(60)
        results = {"uploads": uploads(b, c), "gzip_bombs": gzip_bombs(b), "chunked": chunked(b),
                   "connection_flood": flood(b, c), "hostile_body": hostile_body(b, c)}
    finally:
        b.proc.stop()
    out = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
           "budget_mib": BUDGET // MIB, **results}
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
