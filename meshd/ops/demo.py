"""`meshd demo`: a whole mesh on one machine, and the figure that says whether the mesh helps.

Builds N domains on loopback (identities, configs, a governance registry and a non-IID Dirichlet split of
a bundled dataset, see :mod:`meshd.ops.localmesh`), runs one real ``meshd run`` process per domain, shows their
progress live, and after ``--duration`` seconds of gossip training switches training off (a hot config
reload) and lets gossip alone run for :data:`SETTLE_S` seconds, so that every domain holds the mesh consensus
model. It then compares, per domain, that mesh model with a model trained on the same local data and steps
alone (the daemon's local-only baseline), both scored on a shared test set that covers every class, next to the
centralized reference (the same model trained on the pooled data).  Writes ``report.json`` and
``accuracy.png`` into the work directory.  Every daemon is stopped (SIGTERM, exit codes checked) on the
way out, also on Ctrl-C (exit 130) and on errors.

The last line printed is ``PASS: ...`` (exit 0) when every domain's mesh accuracy is at least its
local-only accuracy plus :data:`REQUIRED_GAIN_POINTS`, else ``FAIL: ...`` (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from meshd.ops.config_template import set_key
from meshd.ops.localmesh import LocalMesh, MeshLayout, build_mesh, centralized_accuracy, get_status

REQUIRED_GAIN_POINTS = 20.0  # mesh accuracy must beat local-only by this many percentage points, every domain
POLL_S = 1.0  # seconds between two status sweeps over all domains
PROGRESS_EVERY_S = 5.0  # seconds between two plain progress lines (no live view)
START_TIMEOUT_S = 90.0  # every daemon must report "running" within this many seconds
EXIT_INTERRUPTED = 130
# After --duration s of training, local training is switched off (a hot config reload) and gossip runs on
# for SETTLE_S s: every domain's model converges to the mesh consensus, and its last evaluation (at most
# eval_interval_s old) scores that model. The local-only baseline stops training at the same moment.
SETTLE_S = 4.0

# Mesh settings of the demo ({section: {key: TOML value}}): the defaults (one epoch per round, paced and
# data-weighted, an exchange every gossip.every_steps local steps, q4 on the wire) apart from the learning rate and an
# evaluation every second for the live view.
DEMO_SETTINGS: dict[str, dict[str, str]] = {
    "training": {"lr": "0.1", "batch_size": "32", "eval_interval_s": "1.0"},
    "log": {"level": '"warning"'},
}
# The centralized reference trains the same model (the config's mlp, hidden [64]) with the same lr and batch.
CENTRAL_STEPS = 2000


class _Terminated(Exception):
    """SIGTERM reached the demo: stop the daemons and leave like Ctrl-C."""


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo described by the parsed `meshd demo` arguments; returns the process exit code."""
    if args.domains < 2:
        print("meshd demo: error: --domains must be at least 2", file=sys.stderr)
        return 2
    if not (args.duration > 0 and math.isfinite(args.duration)):
        print("meshd demo: error: --duration must be > 0", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir is not None else Path(tempfile.mkdtemp(prefix="meshd-demo-"))
    print(f"work directory: {workdir}", flush=True)
    with _interrupts():
        mesh: LocalMesh | None = None
        try:
            timings = {"_t0": time.monotonic()}
            layout = build_mesh(workdir, args.domains, dataset=args.dataset, alpha=args.alpha, seed=args.seed,
                                settings=DEMO_SETTINGS)
            timings["build"] = time.monotonic() - timings["_t0"]
            _print_layout(layout)
            mesh = LocalMesh(layout)
            return _run(args, layout, mesh, timings)
        except (KeyboardInterrupt, _Terminated):
            print("\ninterrupted: stopping the daemons", flush=True)
            if mesh is not None:
                codes = _stop(mesh)
                print(f"daemons stopped (exit codes {_codes_text(codes)})", flush=True)
            return EXIT_INTERRUPTED
        except Exception as exc:
            if mesh is not None:
                _stop(mesh)
            print(f"meshd demo: error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            print(f"FAIL: the demo did not complete ({type(exc).__name__})", flush=True)
            return 1
        finally:
            if mesh is not None and mesh.alive():
                _stop(mesh)


# --- the run ---------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace, layout: MeshLayout, mesh: LocalMesh, timings: dict[str, float]) -> int:
    t_launch = time.monotonic()
    mesh.start()
    pids = {name: proc.pid for name, proc in mesh.procs.items()}
    print(f"starting {len(layout.domains)} daemons (each loads torch; this takes a while on a small machine)...",
          flush=True)
    mesh.wait_running(timeout=START_TIMEOUT_S)
    startup_s = timings["startup"] = time.monotonic() - t_launch
    print(f"all {len(layout.domains)} daemons running after {startup_s:.1f} s; gossip training for "
          f"{args.duration:g} s", flush=True)

    timeline: list[dict[str, Any]] = []
    t0 = time.monotonic()
    latest: dict[str, dict[str, Any] | None] = {}
    use_live = not args.no_live and sys.stdout.isatty()
    if use_live:
        latest = _watch_live(layout, mesh, args.duration, t0, timeline)
    else:
        latest = _watch_plain(layout, mesh, args.duration, t0, timeline)
    # Consensus phase: training off everywhere (hot reload), gossip on; then the final evaluations.
    t_settle = time.monotonic()
    _training_off(layout, mesh)
    print(f"training stopped at {t_settle - t0:.1f} s; gossip alone for {SETTLE_S:g} s so every domain holds the "
          "mesh consensus model", flush=True)
    for _ in range(int(SETTLE_S / POLL_S) + 2):
        now = time.monotonic()
        if now - t_settle >= SETTLE_S:
            break
        time.sleep(min(POLL_S, SETTLE_S - (now - t_settle)))
        latest = _sweep(layout, mesh, time.monotonic() - t0, timeline, phase="consensus") or latest
    run_s = timings["run"] = time.monotonic() - t0
    t_stop = time.monotonic()
    codes = _stop(mesh)
    timings["stop"] = time.monotonic() - t_stop
    print(f"daemons stopped (exit codes {_codes_text(codes)})", flush=True)

    print("training the centralized reference (the same model on the pooled training data)...", flush=True)
    t_central = time.monotonic()
    central = centralized_accuracy(layout, steps=CENTRAL_STEPS, lr=float(DEMO_SETTINGS["training"]["lr"]),
                                   batch_size=int(DEMO_SETTINGS["training"]["batch_size"]), seed=args.seed)
    timings["centralized"] = time.monotonic() - t_central
    final = _final_figures(layout, latest)
    report = {
        "settings": {
            "domains": len(layout.domains), "dataset": layout.dataset, "alpha": layout.alpha, "seed": layout.seed,
            "duration_s": args.duration, "mesh": DEMO_SETTINGS, "model": "mlp", "hidden": [64],
            "required_gain_points": REQUIRED_GAIN_POINTS, "centralized_steps": CENTRAL_STEPS,
            "consensus_phase_s": SETTLE_S,
        },
        "workdir": str(layout.workdir),
        "startup_s": round(startup_s, 3),
        "run_s": round(run_s, 3),
        "training_stopped_at_s": round(t_settle - t0, 3),
        "timings_s": timings,
        "centralized_accuracy": central,
        "domains": final,
        "timeline": timeline,
        "daemons": {name: {"pid": pids[name], "exit_code": codes.get(name)} for name in pids},
    }
    verdict, ok = _verdict(final)
    report["verdict"] = {"pass": ok, "line": verdict}
    timings["total"] = time.monotonic() - timings.pop("_t0")
    report["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    (layout.workdir / "report.json").write_text(json.dumps(report, indent=2))
    _plot(layout.workdir / "accuracy.png", report)
    _print_final(final, central)
    print(f"timings: build {timings['build']:.1f} s, daemon start-up {startup_s:.1f} s, run {run_s:.1f} s, "
          f"stop {timings['stop']:.1f} s, centralized reference {timings['centralized']:.1f} s, "
          f"total {timings['total']:.1f} s")
    print(f"wrote {layout.workdir / 'report.json'} and {layout.workdir / 'accuracy.png'}")
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        print(f"warning: daemons did not stop cleanly: {_codes_text(bad)}; see their daemon.log")
    print(verdict, flush=True)
    return 0 if ok and not bad else 1


def _training_off(layout: MeshLayout, mesh: LocalMesh) -> None:
    """Set training.enabled = false in every domain's config and SIGHUP the daemon (a hot reload)."""
    for d in layout.domains:
        d.config.write_text(set_key(d.config.read_text(), "training", "enabled", "false"))
    for proc in mesh.procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGHUP)


def _sweep(layout: MeshLayout, mesh: LocalMesh, t: float, timeline: list[dict[str, Any]],
           phase: str = "training") -> dict[str, dict[str, Any] | None]:
    """Read every daemon's /status once and append a timeline point; a dead daemon is an error."""
    dead = {n: p.returncode for n, p in mesh.procs.items() if p.poll() is not None}
    if dead:
        raise RuntimeError(f"daemons exited during the demo: {_codes_text(dead)}; see their daemon.log")
    statuses = {d.name: get_status(d.status_url, timeout=2.0) for d in layout.domains}
    point: dict[str, Any] = {"t": round(t, 3), "phase": phase, "domains": {}}
    for name, s in statuses.items():
        if s is not None:
            point["domains"][name] = _row(s)
    timeline.append(point)
    return statuses


def _row(s: dict[str, Any]) -> dict[str, Any]:
    tr, g = s.get("training", {}), s.get("gossip", {})
    counts = s.get("mesh", {}).get("counts", {})
    return {
        "test_accuracy": tr.get("test_accuracy"),
        "local_only_test_accuracy": tr.get("local_only_test_accuracy"),
        "holdout_accuracy": tr.get("holdout_accuracy"),
        "steps": tr.get("steps"),
        "weight": g.get("weight"),
        "consensus_distance": g.get("consensus_distance"),
        "version": s.get("model", {}).get("version"),
        "alive_peers": counts.get("alive", 0),
        "sent": g.get("sent", 0),
        "received": g.get("received", 0),
        "bytes_sent": g.get("bytes_sent", 0),
        "bytes_received": g.get("bytes_received", 0),
    }


def _watch_plain(layout: MeshLayout, mesh: LocalMesh, duration: float, t0: float,
                 timeline: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    latest: dict[str, dict[str, Any] | None] = {}
    next_line = 0.0
    for _ in range(int(duration / POLL_S) + 2):  # bounded: one sweep per POLL_S until the deadline
        now = time.monotonic() - t0
        if now >= duration:
            break
        latest = _sweep(layout, mesh, now, timeline)
        if now >= next_line:
            print(_progress_line(now, timeline[-1]), flush=True)
            next_line = now + PROGRESS_EVERY_S
        time.sleep(max(0.0, min(POLL_S, duration - (time.monotonic() - t0))))
    return latest


def _watch_live(layout: MeshLayout, mesh: LocalMesh, duration: float, t0: float,
                timeline: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    from rich.console import Console
    from rich.live import Live

    latest: dict[str, dict[str, Any] | None] = {}
    with Live(_live_table(layout, {}, 0.0, duration), console=Console(), auto_refresh=False) as live:
        for _ in range(int(duration / POLL_S) + 2):
            now = time.monotonic() - t0
            if now >= duration:
                break
            latest = _sweep(layout, mesh, now, timeline)
            live.update(_live_table(layout, timeline[-1]["domains"], now, duration), refresh=True)
            time.sleep(max(0.0, min(POLL_S, duration - (time.monotonic() - t0))))
    return latest


# What each column measures: a domain holds a few classes only, so its own holdout looks easy.
LIVE_LEGEND = ("holdout acc: the mesh model on the domain's own held-out rows (only the classes it holds); "
               "mesh / local-only test acc: the mesh model / a model trained on the domain's data alone, "
               "on the shared test set (all classes)")


def _live_table(layout: MeshLayout, rows: dict[str, dict[str, Any]], now: float, duration: float) -> Any:
    from rich.table import Table

    table = Table(title=f"meshd demo: {len(layout.domains)} domains, {layout.dataset}, alpha {layout.alpha:g} "
                        f"- {now:.0f} / {duration:g} s",
                  caption=LIVE_LEGEND)
    for col in ("domain", "classes held", "holdout acc", "mesh test acc", "local-only test acc",
                "alive peers", "msgs sent / recv", "model version"):
        table.add_column(col, justify="left" if col in ("domain", "classes held") else "right")
    for d in layout.domains:
        r = rows.get(d.name)
        if r is None:
            table.add_row(d.name, _classes(d.classes), "-", "-", "-", "-", "-", "-")
            continue
        table.add_row(d.name, _classes(d.classes), _pct(r["holdout_accuracy"]), _pct(r["test_accuracy"]),
                      _pct(r["local_only_test_accuracy"]), str(r["alive_peers"]),
                      f"{r['sent']} / {r['received']}", str(r["version"]))
    return table


def _progress_line(now: float, point: dict[str, Any]) -> str:
    rows = point["domains"].values()
    mesh = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    local = [r["local_only_test_accuracy"] for r in rows if r["local_only_test_accuracy"] is not None]
    sent = sum(r["sent"] for r in rows)
    if not mesh:
        return f"[{now:5.1f} s] {len(point['domains'])} domains reporting, no evaluation yet"
    return (f"[{now:5.1f} s] mesh test acc mean {_pct(sum(mesh) / len(mesh))} min {_pct(min(mesh))} | "
            f"local-only mean {_pct(sum(local) / len(local)) if local else '-'} | messages sent {sent}")


# --- results ---------------------------------------------------------------------------------------------------


def _final_figures(layout: MeshLayout, latest: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    out = []
    for d in layout.domains:
        s = latest.get(d.name)
        r = _row(s) if s else {}
        mesh_acc, local_acc = r.get("test_accuracy"), r.get("local_only_test_accuracy")
        gain = None if mesh_acc is None or local_acc is None else round(100 * (mesh_acc - local_acc), 2)
        out.append({
            "domain": d.name, "classes": list(d.classes), "rows": d.rows,
            "mesh_test_accuracy": mesh_acc, "local_only_test_accuracy": local_acc,
            "holdout_accuracy": r.get("holdout_accuracy"), "gain_points": gain,
            "model_version": r.get("version"), "steps": r.get("steps"),
            "consensus_distance": r.get("consensus_distance"),
            "messages_sent": r.get("sent"), "messages_received": r.get("received"),
            "bytes_sent": r.get("bytes_sent"), "bytes_received": r.get("bytes_received"),
        })
    return out


def _verdict(final: list[dict[str, Any]]) -> tuple[str, bool]:
    missing = [f["domain"] for f in final if f["gain_points"] is None]
    if missing:
        return f"FAIL: no accuracy figures from {', '.join(missing)}", False
    worst = min(final, key=lambda f: f["gain_points"])
    min_gain = worst["gain_points"]
    if min_gain >= REQUIRED_GAIN_POINTS:
        return (f"PASS: every domain gained >= {REQUIRED_GAIN_POINTS:g} points over training alone "
                f"(min gain {min_gain:.1f})"), True
    short = sum(1 for f in final if f["gain_points"] < REQUIRED_GAIN_POINTS)
    return (f"FAIL: {short} of {len(final)} domains gained < {REQUIRED_GAIN_POINTS:g} points over training alone "
            f"(min gain {min_gain:.1f}, {worst['domain']})"), False


def _print_layout(layout: MeshLayout) -> None:
    print(f"{len(layout.domains)} domains, dataset {layout.dataset}, Dirichlet alpha {layout.alpha:g}, "
          f"seed {layout.seed}:", flush=True)
    for d in layout.domains:
        print(f"  {d.name:<10} {d.rows:>6} rows  classes {_classes(d.classes)}  status {d.status_url}")


def _print_final(final: list[dict[str, Any]], central: float) -> None:
    header = ("domain", "classes held", "local-only acc", "mesh acc", "gain (points)")
    rows = [(f["domain"], _classes(tuple(f["classes"])), _pct(f["local_only_test_accuracy"]),
             _pct(f["mesh_test_accuracy"]), "-" if f["gain_points"] is None else f"{f['gain_points']:+.1f}")
            for f in final]
    rows.append(("centralized", "all (pooled)", "", _pct(central), ""))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print("\nAccuracy on the shared test set (all classes); mesh = each domain's model after the consensus phase:")
    for r in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, f in enumerate(report["domains"]):
        name, color = f["domain"], cmap(i % 10)
        pts = [(p["t"], p["domains"][name]["test_accuracy"]) for p in report["timeline"]
               if name in p["domains"] and p["domains"][name]["test_accuracy"] is not None]
        if pts:
            ax.plot([t for t, _ in pts], [a for _, a in pts], color=color, lw=1.5, label=f"{name} mesh")
        if f["local_only_test_accuracy"] is not None:
            ax.axhline(f["local_only_test_accuracy"], color=color, ls="--", lw=1, alpha=0.8)
    ax.axhline(report["centralized_accuracy"], color="black", lw=2, label="centralized (pooled data)")
    ax.axvspan(report["training_stopped_at_s"], report["run_s"], color="grey", alpha=0.15,
               label="training off, gossip on")
    ax.plot([], [], color="grey", ls="--", lw=1, label="local-only (final, per domain)")
    s = report["settings"]
    ax.set_title(f"meshd demo: {s['domains']} domains, {s['dataset']}, Dirichlet alpha {s['alpha']:g}")
    ax.set_xlabel("seconds since all daemons were running")
    ax.set_ylabel("accuracy on the shared test set")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- helpers ---------------------------------------------------------------------------------------------------


@contextmanager
def _interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt even where SIGINT was inherited ignored; SIGTERM raises _Terminated."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _stop(mesh: LocalMesh) -> dict[str, int | None]:
    """SIGTERM every daemon and reap it; a second Ctrl-C while stopping is ignored, so none is left behind."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return mesh.stop(timeout=15.0)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def _codes_text(codes: dict[str, int | None]) -> str:
    if codes and all(c == 0 for c in codes.values()):
        return "all 0"
    return ", ".join(f"{n}={'killed' if c is None else c}" for n, c in codes.items())


def _classes(classes: tuple[int, ...]) -> str:
    return ",".join(str(c) for c in classes)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
