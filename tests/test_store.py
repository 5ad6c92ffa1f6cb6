"""Atomic writes, JSON state files, and checkpoints that survive corruption of the newest file."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import torch

import meshd.store
import meshd.task.checkpoints
from meshd.errors import StoreError
from meshd.store import atomic_write, read_json, write_json_atomic
from meshd.task.checkpoints import (
    Checkpoint,
    CheckpointStore,
    decode_checkpoint,
    encode_checkpoint,
    export_state_dict,
)
from meshd.task.models import ModelSpec, build_model, flatten


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ckpt(version: int, created_ms: int = 1_700_000_000_000, n: int = 50) -> Checkpoint:
    gen = torch.Generator().manual_seed(version)
    return Checkpoint(
        version=version,
        weight=0.5 + version,
        values=torch.randn(n, dtype=torch.float64, generator=gen),
        fingerprint="f" * 32,
        created_ms=created_ms + version,
        extra={"steps_done": version * 10, "note": "x", "nested": {"a": [1, 2]}},
    )


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.version, a.weight, a.fingerprint, a.created_ms, a.extra) == (
        b.version,
        b.weight,
        b.fingerprint,
        b.created_ms,
        b.extra,
    )
    assert torch.equal(a.values, b.values)


# --------------------------------------------------------------------------------------- atomic_write


def test_atomic_write_creates_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write(target, b"one")
    assert target.read_bytes() == b"one"
    assert _mode(target) == 0o600
    atomic_write(target, b"two" * 1000, mode=0o644)
    assert target.read_bytes() == b"two" * 1000
    assert _mode(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]  # no temp files left


def test_atomic_write_without_fsync(tmp_path: Path) -> None:
    atomic_write(tmp_path / "f", b"data", fsync=False)
    assert (tmp_path / "f").read_bytes() == b"data"


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"old")
    (tmp_path / "dir").mkdir()
    with pytest.raises(StoreError, match="cannot write"):
        atomic_write(tmp_path / "dir", b"new")  # cannot replace a directory with a file
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f"]
    with pytest.raises(StoreError, match="temporary file"):
        atomic_write(tmp_path / "missing" / "f", b"x")


# --------------------------------------------------------------------------------------------- JSON


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "replay.json"
    obj = {"b": [1, 2, 3], "a": {"peer": 17}, "s": "ü"}
    write_json_atomic(path, obj)
    assert read_json(path) == obj
    assert _mode(path) == 0o600
    assert path.read_text().startswith('{\n  "a"')  # sorted keys, human-readable


def test_read_json_missing_and_invalid(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert read_json(missing, default={}) == {}
    assert read_json(missing, default=None) is None
    with pytest.raises(StoreError, match="file not found"):
        read_json(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(StoreError, match="invalid JSON"):
        read_json(bad)


def test_write_json_refuses_nan_and_unencodable(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot encode"):
        write_json_atomic(tmp_path / "x.json", {"v": float("nan")})
    with pytest.raises(StoreError, match="cannot encode"):
        write_json_atomic(tmp_path / "x.json", {"v": object()})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- checkpoints


def test_store_directory_and_file_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        store = CheckpointStore(tmp_path / "state" / "ckpt")
    finally:
        os.umask(old_umask)
    assert _mode(store.directory) == 0o700
    path = store.save(_ckpt(1))
    assert _mode(path) == 0o600
    assert path.name == "ckpt-s000000000001-v000000000001.mdck"


def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    CheckpointStore(d)
    assert _mode(d) == 0o700


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c")
    ckpt = _ckpt(3, n=1000)
    store.save(ckpt)
    loaded, warnings = store.load_latest()
    assert warnings == []
    assert loaded is not None
    _assert_same(loaded, ckpt)
    assert loaded.values.dtype == torch.float64


def test_real_model_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec("cnn1d")
    model = build_model(spec, 40, seed=0)
    store = CheckpointStore(tmp_path / "c")
    store.save(Checkpoint(version=0, weight=1.0, values=flatten(model), fingerprint="abc", created_ms=5, extra={}))
    loaded, _ = store.load_latest()
    assert loaded is not None and torch.equal(loaded.values, flatten(model))


def test_empty_store(tmp_path: Path) -> None:
    assert CheckpointStore(tmp_path / "c").load_latest() == (None, [])


def test_keep_prunes_to_newest(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=2)
    for v in range(1, 6):
        store.save(_ckpt(v))
    names = sorted(p.name for p in store.directory.iterdir())
    assert names == ["ckpt-s000000000004-v000000000004.mdck", "ckpt-s000000000005-v000000000005.mdck"]
    loaded, _ = store.load_latest()
    assert loaded is not None and loaded.version == 5

    three = CheckpointStore(tmp_path / "c3", keep=3)
    for v in range(1, 6):
        three.save(_ckpt(v))
    assert len(list(three.directory.iterdir())) == 3


def test_order_comes_from_content_not_names(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=5)
    store.save(_ckpt(9))
    newest = store.save(_ckpt(2))
    # A misleading name: the content written last, under an old-style version-0 name, is still the newest.
    newest.rename(store.directory / "ckpt-000000000000-1.mdck")
    loaded, warnings = store.load_latest()
    assert loaded is not None and loaded.version == 2
    assert warnings == []


def test_newest_is_the_last_written_whatever_the_clock_and_version_say(tmp_path: Path) -> None:
    """The wall clock steps back 10 minutes and the version does not move (training off): each new checkpoint
    must still be the newest, kept by pruning and loaded on restart. The store's own write counter orders."""
    store = CheckpointStore(tmp_path / "c", keep=2)
    store.save(_ckpt(7, created_ms=1_700_000_600_000))
    for i in range(3):
        stepped_back = _ckpt(7, created_ms=1_700_000_000_000 + i)  # same version, older clock
        path = store.save(stepped_back)
        assert path.exists(), "a new checkpoint was pruned right after it was written"
    reopened = CheckpointStore(tmp_path / "c", keep=2)  # a restart: the counter continues from the names
    loaded, _ = reopened.load_latest()
    assert loaded is not None and loaded.created_ms == 1_700_000_000_002 + 7 and loaded.seq == 4  # _ckpt adds v
    assert reopened.save(_ckpt(7, created_ms=5)).name == "ckpt-s000000000005-v000000000007.mdck"


def test_checkpoints_of_an_older_meshd_count_as_older(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=5)
    legacy = dataclasses.replace(_ckpt(99), seq=0)
    (store.directory / legacy.file_name).write_bytes(encode_checkpoint(legacy))
    assert legacy.file_name == "ckpt-000000000099-1700000000099.mdck"
    loaded, _ = store.load_latest()
    assert loaded is not None and loaded.version == 99  # still loads
    store.save(_ckpt(3))
    loaded, _ = store.load_latest()
    assert loaded is not None and loaded.version == 3 and loaded.seq == 1


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(300))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_flip_byte, "checksum mismatch"),
        (_truncate, "checksum mismatch"),
        (_garbage, "bad magic: not a meshd checkpoint"),
        (_empty, "truncated: 0 bytes"),
    ],
)
def test_corrupt_newest_falls_back_with_warning(tmp_path: Path, damage: Callable[[Path], None], reason: str) -> None:
    store = CheckpointStore(tmp_path / "c", keep=2)
    store.save(_ckpt(1))
    older = store.save(_ckpt(2))
    newest = store.save(_ckpt(3))
    damage(newest)
    loaded, warnings = store.load_latest()
    assert loaded is not None
    _assert_same(loaded, _ckpt(2))
    assert warnings == [f"checkpoint {newest.name} is corrupt ({reason}); falling back to {older.name}"]


def test_all_corrupt_returns_none_with_warnings(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=2)
    a = store.save(_ckpt(1))
    b = store.save(_ckpt(2))
    _garbage(a)
    _flip_byte(b)
    loaded, warnings = store.load_latest()
    assert loaded is None
    assert len(warnings) == 2
    assert warnings[0].startswith(f"checkpoint {b.name} is corrupt")
    assert all(w.endswith("no valid checkpoint to fall back to") for w in warnings)


def test_older_corrupt_file_is_not_warned_about(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=2)
    old = store.save(_ckpt(1))
    store.save(_ckpt(2))
    _garbage(old)
    loaded, warnings = store.load_latest()
    assert loaded is not None and loaded.version == 2 and warnings == []


def test_save_removes_corrupt_files_and_stale_temp_files(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=2)
    bad = store.save(_ckpt(1))
    _garbage(bad)
    stale = store.directory / ".ckpt-000000000009-1.mdck.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    store.save(_ckpt(2))
    assert not bad.exists() and not stale.exists()
    assert len(list(store.directory.iterdir())) == 1


def _raw_file(store: CheckpointStore, name: str, payload: dict[str, object]) -> Path:
    import hashlib

    body = msgpack.packb(payload, use_bin_type=True)
    path = store.directory / name
    path.write_bytes(meshd.task.checkpoints.CHECKPOINT_MAGIC + hashlib.sha256(body).digest() + body)
    return path


def test_semantically_bad_payloads_are_skipped(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c", keep=5)
    store.save(_ckpt(1))
    good = {
        "format": 1, "version": 5, "weight": 1.0, "fingerprint": "f", "created_ms": 1,
        "count": 2, "values": b"\x00" * 16, "extra": {},
    }  # fmt: skip
    cases = {
        "ckpt-s000000000005-v000000000005.mdck": {**good, "values": b"\x00" * 15},
        "ckpt-s000000000006-v000000000006.mdck": {**good, "version": "6"},
        "ckpt-s000000000007-v000000000007.mdck": {**good, "format": 2},
        "ckpt-s000000000008-v000000000008.mdck": {**good, "values": b"\x00" * 8 + b"\x00\x00\x00\x00\x00\x00\xf8\x7f"},
        "ckpt-s000000000009-v000000000009.mdck": {k: v for k, v in good.items() if k != "extra"},
    }
    for name, payload in cases.items():
        _raw_file(store, name, payload)
    loaded, warnings = store.load_latest()
    assert loaded is not None and loaded.version == 1
    reasons = " | ".join(warnings)
    assert len(warnings) == 5
    for fragment in ["values hold 15 bytes", "'version'", "unsupported format 2", "non-finite", "'extra'"]:
        assert fragment in reasons


def test_decode_rejects_msgpack_bombs() -> None:
    import hashlib

    # A map header claiming 2**31 entries in a tiny payload must fail fast, not allocate.
    body = b"\xdf\x80\x00\x00\x00"
    blob = meshd.task.checkpoints.CHECKPOINT_MAGIC + hashlib.sha256(body).digest() + body
    with pytest.raises(meshd.task.checkpoints.CorruptCheckpoint, match="undecodable payload"):
        decode_checkpoint(blob)


def test_encode_decode_and_unencodable_extra() -> None:
    ckpt = _ckpt(4)
    _assert_same(decode_checkpoint(encode_checkpoint(ckpt)), ckpt)
    bad = Checkpoint(version=1, weight=1.0, values=torch.zeros(2), fingerprint="f", created_ms=0, extra={"o": object()})
    with pytest.raises(StoreError, match="not msgpack-encodable"):
        encode_checkpoint(bad)


def test_checkpoint_validation_and_normalisation() -> None:
    c = Checkpoint(version=0, weight=1, values=torch.ones(3, dtype=torch.float32), fingerprint="f", created_ms=0)
    assert c.values.dtype == torch.float64 and isinstance(c.weight, float) and c.extra == {}
    with pytest.raises(StoreError, match="1-D"):
        Checkpoint(version=0, weight=1.0, values=torch.ones(2, 2), fingerprint="f", created_ms=0)
    with pytest.raises(StoreError, match="version"):
        Checkpoint(version=-1, weight=1.0, values=torch.ones(2), fingerprint="f", created_ms=0)
    with pytest.raises(StoreError, match="keep"):
        CheckpointStore(Path("/nonexistent-meshd-test"), keep=0)


def test_export_state_dict(tmp_path: Path) -> None:
    model = build_model(ModelSpec("mlp"), 64, seed=0)
    path = tmp_path / "model.pt"
    export_state_dict(model, path, mode=0o644)
    assert _mode(path) == 0o644
    state = torch.load(path, weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_store_does_not_use_pickle() -> None:
    for module in (meshd.store, meshd.task.checkpoints):
        source = Path(module.__file__ or "").read_text()
        assert "import pickle" not in source and "pickle.load" not in source
