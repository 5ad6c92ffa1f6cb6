"""Acceptance tests of the gossip learning engine: real `meshd run` daemons on loopback, full wire security.

* four domains with a Dirichlet(0.1) label split of scikit-learn digits learn, by gossip, a model that
  beats each domain's local-only baseline on a shared test set covering every class; one of them is
  killed with SIGKILL mid-training and resumes from its checkpoint;
* a corrupt newest checkpoint falls back to the previous one, with a warning naming the file;
* with training off, the daemons' models converge to the exact mean of their starting models, and an
  incompatible model (another architecture, trusted) is refused with 409, never merged;
* `meshd export` writes a state_dict equal to the newest checkpoint.

Every wait is a poll with a generous deadline (the machine is small and busy); nothing asserts on time.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from meshd.ops.config_template import set_key
from meshd.ops.localmesh import DomainLayout, LocalMesh, MeshLayout, build_mesh, get_status
from meshd.task import models
from meshd.task.checkpoints import Checkpoint, CheckpointStore, decode_checkpoint
from meshd.task.data import load_data_product
from meshd.task.engine import Engine
from meshd.task.learner import Learner, TrainConfig
from tests.helpers import run_cli, wait_for

NUM_CLASSES = 10
DIGITS_FEATURES = 64  # the data product's feature count: 8x8 digit images
GAIN = 0.20  # the mesh must beat local-only training by at least 20 accuracy points on the shared test set

# The defaults (one epoch per training round, gossip.per_round exchanges per round, data-weighted updates,
# paced to the peers) apart from the learning rate and a checkpoint interval short enough for kill -9 tests.
TRAIN_SETTINGS: dict[str, dict[str, str]] = {
    "training": {"lr": "0.1"},
    "checkpoint": {"interval_s": "1.0"},
}


# --- helpers ------------------------------------------------------------------------------------------------


def _checkpoints(domain: DomainLayout) -> CheckpointStore:
    return CheckpointStore(domain.directory / "state" / "tasks" / "default" / "checkpoints")


def _checkpoint_files(domain: DomainLayout) -> list[Path]:
    """Checkpoint files, oldest first by the store's write counter (``ckpt-s<seq>-v<version>.mdck``)."""
    directory = domain.directory / "state" / "tasks" / "default" / "checkpoints"
    files = [p for p in directory.glob("ckpt-s*-v*.mdck")] if directory.is_dir() else []
    return sorted(files, key=lambda p: int(p.stem.split("-")[1][1:]))


def _events(domain: DomainLayout, offset: int = 0) -> list[dict[str, Any]]:
    """JSON log events of a domain's daemon.log from byte `offset` on (other lines are skipped)."""
    out = []
    with open(domain.directory / "daemon.log", "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                out.append(event)
    return out


def _log_size(domain: DomainLayout) -> int:
    path = domain.directory / "daemon.log"
    return path.stat().st_size if path.exists() else 0


def _status(domain: DomainLayout) -> dict[str, Any]:
    s = get_status(domain.status_url, timeout=10.0)
    assert s is not None, f"{domain.name}: /status did not answer"
    return s


def _figures(statuses: dict[str, dict[str, Any] | None]) -> dict[str, tuple[Any, Any, Any]]:
    """(mesh test accuracy, local-only test accuracy, model version) per domain."""
    out = {}
    for name, s in statuses.items():
        t, m = (s or {}).get("training", {}), (s or {}).get("model", {})
        out[name] = (t.get("test_accuracy"), t.get("local_only_test_accuracy"), m.get("version"))
    return out


def _gain_met(fig: tuple[Any, Any, Any]) -> bool:
    acc, local, _ = fig
    return acc is not None and local is not None and acc >= local + GAIN


def _start_model(seed: int, hidden: tuple[int, ...] = (64,)) -> torch.Tensor:
    spec = models.ModelSpec(name="mlp", hidden=hidden, num_classes=NUM_CLASSES)
    return models.flatten(models.build_model(spec, DIGITS_FEATURES, models.initial_seed(spec, DIGITS_FEATURES, seed)))


def _accuracy(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    module.eval()
    with torch.no_grad():
        return int((module(x).argmax(dim=1) == y).sum()) / int(y.shape[0])


def _assert_no_blocking_calls(layout: MeshLayout) -> None:
    """The suite runs daemons with MESHD_BLOCKBUSTER=1 (conftest): a blocking call on a loop is logged."""
    for d in layout.domains:
        log = (d.directory / "daemon.log").read_text(errors="replace")
        assert "BlockingError" not in log, f"blocking call on the event loop of {d.name}:\n{log[-4000:]}"


def _print_classes(layout: MeshLayout) -> None:
    for d in layout.domains:
        print(f"{d.name}: {d.rows} training rows, classes {list(d.classes)}")


# --- a single daemon: corrupt newest checkpoint ---------------------------------------------------------------


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    settings = {
        "gossip": {"interval_s": "0.2", "pull_on_join": "false"},  # alone: nobody to pull from
        "training": {"steps_per_round": "5"},  # a training round (version + 1) every 0.2 s
        "checkpoint": {"interval_s": "1.0", "keep": "2"},  # so the two kept checkpoints usually differ
    }
    layout = build_mesh(tmp_path / "single", 1, settings=settings)
    (domain,) = layout.domains
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(180)
        # two checkpoints of a model that has trained
        wait_for(lambda: len(_checkpoint_files(domain)) >= 2 and _status(domain)["model"]["version"] >= 3,
                 timeout=180, interval=0.2, what="two checkpoints of a trained model")
        assert mesh.stop(timeout=60) == {domain.name: 0}
        files = _checkpoint_files(domain)
        assert len(files) == 2, files  # checkpoint.keep = 2
        previous_file, newest_file = files
        previous = decode_checkpoint(previous_file.read_bytes())
        newest = decode_checkpoint(newest_file.read_bytes())
        assert previous.weight == 1.0 and newest.weight == 1.0  # alone: all the mass stays here

        blob = bytearray(newest_file.read_bytes())
        middle = len(blob) // 2
        for i in range(middle, middle + 16):
            blob[i] ^= 0xFF
        newest_file.write_bytes(bytes(blob))

        # restart on the same config, with training off so that the restored model stays put
        domain.config.write_text(set_key(domain.config.read_text(), "training", "enabled", "false"))
        offset = _log_size(domain)
        mesh.start()
        mesh.wait_running(180)
        status = wait_for(lambda: (s := _status(domain))["model"]["sha256"] and s, timeout=60,
                          interval=0.2, what="a first evaluation after the restart")
        events = _events(domain, offset)
        warnings = [e for e in events if e.get("event") == "engine_warning"]
        assert any(newest_file.name in e.get("detail", "") and "corrupt" in e.get("detail", "")
                   and previous_file.name in e.get("detail", "") for e in warnings), warnings
        loaded = [e for e in events if e.get("event") == "checkpoint_loaded"]
        assert [(e["file"], e["version"]) for e in loaded] == [(previous_file.name, previous.version)]
        assert status["model"]["version"] == previous.version
        assert status["model"]["sha256"] == Engine.digest(previous.values)
        if not torch.equal(previous.values, newest.values):
            assert status["model"]["sha256"] != Engine.digest(newest.values)
        print(f"corrupt {newest_file.name} (version {newest.version}) skipped; "
              f"loaded {previous_file.name} (version {previous.version})")
    finally:
        mesh.stop()
    _assert_no_blocking_calls(layout)


# --- consensus with training off, and an incompatible model --------------------------------------------------


@pytest.mark.slow
def test_consensus_is_the_exact_mean_and_incompatible_model_is_refused(tmp_path: Path) -> None:
    """Four compatible daemons (given different starting models, `model.init_seed` 0-3, so that there is
    something to average) average to the exact mean of their starting models over real sockets; a fifth
    daemon, trusted but with `model.hidden = [32]`, is answered 409, shown as incompatible and never merged.

    Shutdown and in-flight shares: a share is subtracted by its sender only when the receiver's 204
    arrives. A graceful stop cancels the gossip tasks, so a share the receiver merged but whose 204 the
    sender never processed is abandoned (its mass is then counted twice), and a share merged by a
    receiver after its final checkpoint is lost. Near consensus such a share carries (almost) the
    common model, so it moves no node's model noticeably, but the push-sum weights would no longer sum
    to the number of nodes. To assert exact conservation, the test first has every node leave the mesh
    through its config (`mesh.enabled = false`: shares are then answered 503 and kept by their sender),
    waits until no share is pending anywhere, and only then stops the daemons.
    """
    settings = {
        "training": {"enabled": "false"},
        # Exact averaging is push-sum's (the clipped rule gives up a little of it: docs/learning.md section 8)
        "gossip": {"pull_on_join": "false", "codec": '"f64"', "interval_s": "0.2", "merge": '"pushsum"'},
        "checkpoint": {"interval_s": "5.0"},
    }
    layout = build_mesh(tmp_path / "consensus", 5, settings=settings)
    *domains, odd = layout.domains
    odd.config.write_text(set_key(odd.config.read_text(), "model", "hidden", "[32]"))
    for i, d in enumerate(domains):
        d.config.write_text(set_key(d.config.read_text(), "model", "init_seed", str(i)))
    starts = [_start_model(seed) for seed in range(4)]
    exact_mean = torch.stack(starts).mean(dim=0)
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(240)

        def converged() -> list[float] | None:
            ds = [_status(d)["gossip"].get("consensus_distance") for d in domains]
            return ds if all(x is not None and x < 1e-9 for x in ds) else None

        t0 = time.monotonic()
        distances = wait_for(converged, timeout=240, interval=0.5, what="consensus distance < 1e-9 on all four")
        print(f"consensus distance < 1e-9 after {time.monotonic() - t0:.1f}s: {distances}")

        # The incompatible domain: every compatible domain shows it as incompatible (its pongs list another
        # model fingerprint for the task), and the other way round; so no share is offered either way. A share
        # sent anyway (tests/test_model_shares.py sends one) is refused with 409 and never merged.
        def flagged_everywhere() -> list[str] | None:
            ss = [_status(d) for d in domains]
            flags = [s["tasks"]["default"]["peers"].get(odd.peer_id, {}).get("incompatible") for s in ss]
            theirs = _status(odd)["tasks"]["default"]["peers"]
            back = [theirs.get(d.peer_id, {}).get("incompatible") for d in domains]
            return flags if all(f == "incompatible" for f in flags + back) else None

        incompatible = wait_for(flagged_everywhere, timeout=120, interval=0.5,
                                what="every compatible domain to flag the incompatible model, and it them")
        odd_status = _status(odd)
        assert odd_status["model"]["fingerprint"] != _status(domains[0])["model"]["fingerprint"]
        assert odd_status["gossip"]["weight"] == 1.0  # no share of it was ever acknowledged (confirmed)
        assert odd_status["gossip"]["merged"] == 0  # and it merged none of theirs
        assert all(_status(d)["gossip"]["merged"] > 0 for d in domains)
        refused = [e for e in _events(odd) if e.get("event") == "send_refused"]
        # (a retried envelope may be answered 'replayed': also a 409, and the first attempt was refused)
        assert all(e["status"] == 409 and e["kind"] in ("share", "pull") for e in refused), refused
        assert mesh.stop(odd.name, timeout=60) == {odd.name: 0}
        print(f"incompatible shares refused per domain: {incompatible}")

        # leave the mesh (config reload), then wait until no share is in flight anywhere
        for d in domains:
            d.config.write_text(set_key(d.config.read_text(), "mesh", "enabled", "false"))
            mesh.procs[d.name].send_signal(signal.SIGHUP)

        def quiet() -> list[float] | None:
            ss = [_status(d) for d in domains]
            if all(not s["mesh"]["enabled"] and s["gossip"]["pending_shares"] == 0 for s in ss):
                return [s["gossip"]["weight"] for s in ss]
            return None

        weights = wait_for(quiet, timeout=60, interval=0.2, what="every node out of the mesh, nothing pending")
        codes = mesh.stop(timeout=60)
        assert [codes[d.name] for d in domains] == [0] * len(domains), codes
    finally:
        mesh.stop()

    ckpts: list[Checkpoint] = []
    for d in domains:
        ckpt, warnings = _checkpoints(d).load_latest()
        assert ckpt is not None and not warnings, (d.name, warnings)
        ckpts.append(ckpt)
    assert [c.weight for c in ckpts] == weights  # the final checkpoint holds the state the node stopped with
    total_weight = sum(c.weight for c in ckpts)
    pushsum_mean = sum(c.values * c.weight for c in ckpts) / total_weight
    node_mean = torch.stack([c.values for c in ckpts]).mean(dim=0)
    spread = max(float((c.values - node_mean).abs().max()) for c in ckpts)
    off_exact = max(float((c.values - exact_mean).abs().max()) for c in ckpts)
    mass_error = float((pushsum_mean - exact_mean).abs().max())
    print(f"weights {weights} (sum {total_weight!r}); max |z_i - mean of nodes| {spread:.3g}; "
          f"max |z_i - exact start mean| {off_exact:.3g}; max |S/W - exact start mean| {mass_error:.3g}; "
          f"mean |start mean| {float(exact_mean.abs().mean()):.3g}")
    # Mass is conserved exactly (up to float64 rounding): nothing lost, nothing duplicated, nothing foreign.
    assert abs(total_weight - 4.0) < 1e-12
    assert mass_error < 1e-12
    # Every node holds the exact mean, to far better than the consensus threshold (measured ~1e-15).
    assert spread < 1e-9
    assert off_exact < 1e-9
    _assert_no_blocking_calls(layout)


# --- four learning domains -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def learning_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    layout = build_mesh(tmp_path_factory.mktemp("learning"), 4, alpha=0.1, seed=0, settings=TRAIN_SETTINGS)
    _print_classes(layout)
    mesh = LocalMesh(layout)
    try:
        mesh.start()
        mesh.wait_running(240)
        yield mesh
    finally:
        mesh.stop()


@pytest.mark.slow
def test_mesh_beats_local_only_and_resumes_after_kill9(learning_mesh: LocalMesh) -> None:
    mesh = learning_mesh
    layout = mesh.layout
    victim = layout.domains[1]

    # kill -9 mid-training, once it has checkpointed a trained model
    def trained_checkpoint() -> Checkpoint | None:
        ckpt, _ = _checkpoints(victim).load_latest()
        return ckpt if ckpt is not None and ckpt.version >= 5 else None

    wait_for(trained_checkpoint, timeout=180, interval=0.2, what=f"{victim.name} to checkpoint a trained model")
    mesh.kill9(victim.name)
    newest, warnings = _checkpoints(victim).load_latest()
    assert newest is not None and not warnings, warnings
    offset = _log_size(victim)
    mesh.start(victim.name)
    mesh.wait_running(240)
    version = _status(victim)["model"]["version"]
    assert version != 0 and version >= newest.version, (version, newest.version)
    loaded = [e for e in _events(victim, offset) if e.get("event") == "checkpoint_loaded"]
    assert [(e["file"], e["version"]) for e in loaded] == [(newest.file_name, newest.version)], loaded
    print(f"{victim.name} killed; restarted at version {version} from {newest.file_name}")

    # every domain: mesh model >= local-only model + 20 points on the shared test set (all classes)
    deadline = time.monotonic() + 240
    t0 = time.monotonic()
    figures = _figures(mesh.statuses())
    while not all(_gain_met(f) for f in figures.values()):
        assert mesh.alive() == [d.name for d in layout.domains], f"a daemon died: alive {mesh.alive()}"
        if time.monotonic() > deadline:
            pytest.fail(f"mesh never beat local-only by {GAIN} on every domain; last (mesh, local-only, "
                        f"version): {figures}")
        time.sleep(1.0)  # polling interval of a deadline loop
        figures = _figures(mesh.statuses())
    print(f"gain reached {time.monotonic() - t0:.1f}s after the restart; (mesh, local-only, version): {figures}")


@pytest.mark.slow
def test_the_local_only_baseline_stops_training_once_converged(learning_mesh: LocalMesh) -> None:
    """`training.local_baseline_patience` (5 epochs by default): a baseline whose holdout accuracy stopped
    rising stops training and being scored, says so once in the log and in /status, and keeps its last scores
    while the mesh model trains on."""
    mesh = learning_mesh
    others = [d for d in mesh.layout.domains if d.name != mesh.layout.domains[1].name]  # [1] was restarted

    def converged() -> tuple[DomainLayout, dict[str, Any]] | None:
        for d in others:
            tr = _status(d)["training"]
            if tr.get("local_only_converged"):
                return d, tr
        return None

    domain, first = wait_for(converged, timeout=240, interval=0.5, what="a local-only baseline to converge")
    assert first["local_only_accuracy"] is not None

    def evaluated_later() -> dict[str, Any] | None:
        tr = _status(domain)["training"]
        per_epoch = first["steps"] / max(first["epochs"], 1e-9)
        return tr if tr["evaluated_at_steps"] >= first["evaluated_at_steps"] + 2 * per_epoch else None

    later = wait_for(evaluated_later, timeout=240, interval=0.5, what=f"{domain.name} to train two more epochs")
    assert later["local_only_converged"] is True
    assert (later["local_only_accuracy"], later["local_only_test_accuracy"]) == (
        first["local_only_accuracy"], first["local_only_test_accuracy"])  # no longer trained nor re-scored
    events = [e for e in _events(domain) if e.get("event") == "local_baseline_converged"]
    assert len(events) == 1, events


@pytest.mark.slow
def test_export_equals_the_served_model_of_the_checkpoint(learning_mesh: LocalMesh, tmp_path: Path) -> None:
    mesh = learning_mesh
    domain = mesh.layout.domains[0]
    last = _status(domain)["training"]
    assert mesh.stop(timeout=60) == {d.name: 0 for d in mesh.layout.domains}  # graceful: a final checkpoint each
    ckpt, warnings = _checkpoints(domain).load_latest()
    assert ckpt is not None and not warnings, warnings

    out = tmp_path / "model.pt"
    r = run_cli("export", "--config", str(domain.config), "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    state = torch.load(out, weights_only=True)
    spec = models.ModelSpec(name="mlp", hidden=(64,), num_classes=NUM_CLASSES)
    exported = models.build_model(spec, DIGITS_FEATURES, seed=1234)  # any init: every value is overwritten
    exported.load_state_dict(state)
    # export writes the model the domain serves (docs/learning.md section 5), saved with the checkpoint
    served = ckpt.extra.get("served")
    assert isinstance(served, bytes) and len(served) == 8 * ckpt.values.numel()
    served_values = torch.frombuffer(bytearray(served), dtype=torch.float64).clone()
    from_ckpt = models.build_model(spec, DIGITS_FEATURES, seed=4321)
    models.load_flat(from_ckpt, served_values)
    for name, tensor in from_ckpt.state_dict().items():
        assert torch.equal(state[name], tensor), name

    test = load_data_product(mesh.layout.test_path, "label", None, 0.0, NUM_CLASSES, 0)
    acc_exported = _accuracy(exported, test.train_x, test.train_y)
    acc_ckpt = _accuracy(from_ckpt, test.train_x, test.train_y)
    assert acc_exported == acc_ckpt
    # the daemon's own evaluation path agrees
    learner = Learner(models.build_model(spec, DIGITS_FEATURES, 0), test, TrainConfig())
    assert learner.evaluate(served_values, test.train_x, test.train_y) == acc_exported
    print(f"{domain.name}: exported model test accuracy {acc_exported:.3f} (checkpoint version {ckpt.version}); "
          f"last reported while running {last['test_accuracy']} (local-only {last['local_only_test_accuracy']})")
    _assert_no_blocking_calls(mesh.layout)

