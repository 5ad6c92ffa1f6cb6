"""Several learning tasks per domain: the [[task]] tables, their defaults, reload rules, the template `meshd init`
writes, and how `meshd status` / `meshd peers` show tasks. Fast: no daemons, no network."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshd import config as configmod
from meshd.errors import ConfigError
from meshd.ops import cli
from meshd.ops.config_template import render, set_key

BASE = {"node": {"domain": "payments"}}


def _load(raw: dict[str, Any], tmp_path: Path) -> configmod.Config:
    return configmod.from_dict({**BASE, **raw}, base_dir=tmp_path)


def _problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        _load(raw, tmp_path)
    return exc.value.problems


# --- the schema ---------------------------------------------------------------------------------------------


def test_two_tasks_inherit_top_level_defaults_key_by_key(tmp_path: Path) -> None:
    cfg = _load({
        "model": {"name": "logreg", "num_classes": 3},
        "training": {"lr": 0.2, "batch_size": 16},
        "gossip": {"fanout": 2, "retries": 5},
        "checkpoint": {"keep": 4},
        "data": {"label": "y"},
        "task": [
            {"name": "fraud", "model": {"num_classes": 2}, "training": {"lr": 0.01}},
            {"name": "churn", "cohort": ["sales", "support"], "gossip": {"codec": "f32"},
             "data": {"path": "churn.csv"}},
        ],
    }, tmp_path)
    fraud, churn = cfg.tasks
    assert (fraud.name, churn.name) == ("fraud", "churn")
    # the task's own key wins, the others come from the top-level table, then from the schema's defaults
    assert fraud.model.name == "logreg" and fraud.model.num_classes == 2
    assert churn.model == configmod.ModelConfig(name="logreg", num_classes=3)
    assert fraud.training.lr == 0.01 and fraud.training.batch_size == 16
    assert churn.training.lr == 0.2 and churn.training.batch_size == 16
    assert fraud.gossip.fanout == churn.gossip.fanout == 2
    assert churn.gossip.codec == "f32" and fraud.gossip.codec == "auto"
    assert configmod.codec_for(churn) == "f32" and configmod.codec_for(fraud) == "q4"
    regression = dataclasses.replace(fraud, model=dataclasses.replace(fraud.model, task="regression"))
    assert configmod.codec_for(regression) == "q8"  # q4 doubled a regression's RMSE
    assert fraud.gossip.retries == churn.gossip.retries == cfg.gossip.retries == 5  # mesh-wide, from [gossip]
    assert fraud.checkpoint.keep == churn.checkpoint.keep == 4
    assert churn.data.label == fraud.data.label == "y"
    assert churn.data.path == tmp_path / "churn.csv" and fraud.data.path is None
    assert fraud.cohort == ("*",) and churn.cohort == ("sales", "support")


def test_duplicate_task_names_are_refused(tmp_path: Path) -> None:
    problems = _problems({"task": [{"name": "fraud"}, {"name": "fraud"}]}, tmp_path)
    assert any(p.startswith("task[1].name:") and "'fraud'" in p for p in problems), problems
    assert not any(p.startswith("task[0].name") for p in problems)


def test_a_bad_cohort_item_is_refused(tmp_path: Path) -> None:
    problems = _problems({"task": [{"name": "fraud", "cohort": ["sales", "Not A Domain!"]}]}, tmp_path)
    assert any(p.startswith("task[0].cohort:") and "item 1" in p for p in problems), problems
    assert any(p.startswith("task[0].cohort:") for p in _problems({"task": [{"cohort": []}]}, tmp_path))
    assert any(p.startswith("task[0].cohort:") for p in _problems({"task": [{"cohort": ["*", "sales"]}]}, tmp_path))


def test_mesh_wide_gossip_keys_are_refused_in_a_task(tmp_path: Path) -> None:
    problems = _problems({"task": [{"name": "fraud", "gossip": {"retries": 3, "fanout": 2}}]}, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("task[0].gossip.retries:")
    assert "[gossip]" in problems[0]


def test_without_task_tables_there_is_one_default_task_of_the_top_level_sections(tmp_path: Path) -> None:
    cfg = _load({"model": {"name": "cnn1d"}, "training": {"lr": 0.3}, "gossip": {"codec": "f16"},
                 "data": {"path": "d.csv"}, "checkpoint": {"keep": 3}}, tmp_path)
    assert cfg.task == ()
    (task,) = cfg.tasks
    assert task.name == configmod.DEFAULT_TASK == "default"
    assert task.cohort == ("*",)
    for section in configmod.TASK_SECTIONS:
        assert getattr(task, section) == getattr(cfg, section), section


def test_a_task_restarts_for_its_model_and_optimizer_but_not_for_its_pace(tmp_path: Path) -> None:
    old = _load({"task": [{"name": "fraud"}]}, tmp_path).tasks[0]
    assert configmod.task_needs_restart(old, dataclasses.replace(old, model=configmod.ModelConfig(name="logreg"))) \
        == ["model.name"]
    # The optimizer is built when the task opens: a new learning rate restarts the task (from its checkpoint).
    new = dataclasses.replace(old, training=dataclasses.replace(old.training, lr=0.5))
    assert configmod.task_needs_restart(old, new) == ["training.lr"]
    paced = dataclasses.replace(old, training=dataclasses.replace(old.training, pace="free", enabled=False))
    assert configmod.task_needs_restart(old, paced) == []
    assert configmod.task_needs_restart(old, old) == []


def test_pending_restart_ignores_task_keys(tmp_path: Path) -> None:
    old = _load({"task": [{"name": "fraud"}]}, tmp_path)
    new = _load({"model": {"name": "logreg"}, "data": {"path": "x.csv"},
                 "task": [{"name": "fraud", "model": {"hidden": [8]}}, {"name": "churn"}]}, tmp_path)
    assert configmod.diff(old, new)  # they differ...
    assert configmod.pending_restart(old, new) == []  # ...but only in keys a reload applies (per task)
    moved = _load({"listen": {"peer": "0.0.0.0:9999"}, "task": [{"name": "fraud"}]}, tmp_path)
    assert configmod.pending_restart(old, moved) == ["listen.peer"]


# --- the template `meshd init` writes ---------------------------------------------------------------------------


def test_the_template_is_one_default_task_with_every_per_task_key(tmp_path: Path) -> None:
    text = render("payments", data_path="/srv/payments.csv")
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    cfg = configmod.load(path)
    assert len(cfg.task) == 1 and cfg.tasks[0].name == "default" and cfg.tasks[0].cohort == ("*",)
    assert cfg.tasks[0].data.path == Path("/srv/payments.csv")
    raw = tomllib.loads(text)
    assert set(raw["gossip"]) == set(configmod.MESH_GOSSIP_KEYS)  # per-task gossip keys live in [task.gossip]
    for section in configmod.TASK_SECTIONS:
        assert section not in raw or section == "gossip", section
        cls = type(getattr(configmod.TaskConfig(), section))
        keys = {f.name for f in dataclasses.fields(cls)}
        if section == "gossip":
            keys -= set(configmod.MESH_GOSSIP_KEYS)
        assert set(raw["task"][0][section]) == keys, section
    # the example second task, uncommented, is a valid config too
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line == "# [[task]]")
    second = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines[start:])
    path.write_text(text + "\n" + second + "\n")
    cfg = configmod.load(path)
    assert [t.name for t in cfg.tasks] == ["default", "churn"]
    assert cfg.tasks[1].cohort == ("sales", "support")
    assert cfg.tasks[1].model.name == "logreg" and cfg.tasks[1].gossip == configmod.GossipConfig()


def test_set_key_sets_task_sections_where_they_take_effect(tmp_path: Path) -> None:
    text = render("payments")
    for section, key, value in (("training", "enabled", "false"), ("model", "hidden", "[32]"),
                                ("gossip", "interval_s", "0.5"), ("gossip", "retries", "4"),
                                ("checkpoint", "keep", "5"), ("data", "test_path", '"t.npz"')):
        text = set_key(text, section, key, value)
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    (task,) = configmod.load(path).tasks
    assert task.training.enabled is False and task.model.hidden == (32,)
    assert task.gossip.interval_s == 0.5 and task.gossip.retries == 4 and task.checkpoint.keep == 5
    assert task.data.test_path == tmp_path / "t.npz"
    raw = tomllib.loads(text)
    assert raw["gossip"]["retries"] == 4 and "interval_s" not in raw["gossip"]
    # a second task without a [task.training] table inherits the top-level one: set_key sets that too
    two = render("payments") + '\n[[task]]\nname = "churn"\n'
    two = set_key(two, "training", "enabled", "false")
    path.write_text(two)
    assert [t.training.enabled for t in configmod.load(path).tasks] == [False, False]
    # without [[task]] tables, the top-level section as before
    plain = set_key("[node]\ndomain = \"x\"\n", "training", "lr", "0.1")
    assert tomllib.loads(plain)["training"] == {"lr": 0.1}


def test_meshd_init_writes_the_task_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["init", "--domain", "sales", "--dir", str(tmp_path / "d"), "--data", "rows.csv"]) == 0
    cfg = configmod.load(tmp_path / "d" / "meshd.toml")
    assert cfg.node.domain == "sales"
    (task,) = cfg.tasks
    assert task.name == "default" and task.data.path == Path("rows.csv").resolve()
    assert "peer id:" in capsys.readouterr().out


# --- `meshd status` / `meshd peers` ---------------------------------------------------------------------------

A, B, C = "a" * 64, "b" * 64, "c" * 64


def _snapshot() -> dict[str, Any]:
    def task(state: str, cohort: list[str], peers: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return {"state": state, "error": kw.get("error"), "cohort": cohort, "joined": state == "running",
                "peers": peers, "model": kw.get("model", {}), "training": kw.get("training", {}),
                "gossip": kw.get("gossip", {})}

    return {
        "domain": "payments", "peer_id": "f" * 64, "version": "0.9", "uptime_s": 12.5, "state": "running",
        "config": {"path": "/etc/meshd/meshd.toml", "loaded_at": "now", "last_reload_ok": True,
                   "pending_restart": []},
        "mesh": {"joined": False, "counts": {"alive": 3}, "peers": [
            {"domain": "sales", "peer_id": A, "address": "10.0.0.2:7452", "state": "alive", "source": "mdns",
             "last_seen_s": 0.4, "tasks": {"default": {"fp": "x", "schema": "s"}, "churn": {"fp": "y", "schema": "t"}}},
            {"domain": "support", "peer_id": B, "address": None, "state": "alive", "source": "registry",
             "last_seen_s": None, "tasks": {"default": {"fp": "z", "schema": "s"}}},
            {"domain": "hr", "peer_id": C, "address": "10.0.0.4:7452", "state": "alive", "source": "static",
             "last_seen_s": 2.0, "tasks": {}},
        ]},
        "model": {"name": "mlp", "version": 7, "parameters": 1234, "fingerprint": "abcdef0123456789"},
        "training": {"steps": 40, "epochs": 2.0, "holdout_accuracy": 0.875},
        "gossip": {"rounds": 9, "sent": 5, "received": 6, "merged": 4, "rejected": {"replay": 1}},
        "tasks": {
            "default": task("running", ["*"], {
                A: {"runs": True, "fp": "x", "schema": "s", "incompatible": None, "epochs": 1.5},
                B: {"runs": True, "fp": "z", "schema": "s", "incompatible": "incompatible", "epochs": None},
            }, model={"name": "mlp", "version": 7}, training={"steps": 40, "epochs": 2.0,
                                                             "holdout_accuracy": 0.875, "local_only_accuracy": 0.5},
                gossip={"merged": 4}),
            "churn": task("failed", ["sales", "support"], {B: {"runs": False, "incompatible": "unknown_task"}},
                          error="data.path: file not found"),
        },
    }


def _row(text: str, first: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(first + " "))


def test_status_shows_one_row_per_task() -> None:
    out = cli.format_status(_snapshot())
    assert _row(out, "domain").endswith("payments")
    assert "holdout acc 0.875" in _row(out, "training")  # the default task, as before
    assert "replay 1" in _row(out, "rejected")
    header = _row(out, "TASK")
    for col in ("STATE", "JOINED", "MODEL", "VERSION", "STEPS", "HOLDOUT ACC", "LOCAL-ONLY", "MERGED", "PEERS OK",
                "COHORT"):
        assert col in header
    assert _row(out, "default").split() == ["default", "running", "yes", "mlp", "v7", "40", "2", "0.875", "0.5",
                                            "4", "1/2", "*"]
    churn = _row(out, "churn").split()
    assert churn[:3] == ["churn", "failed", "no"] and churn[-2:] == ["0/1", "sales,support"]
    assert "task churn failed: data.path: file not found" in out


def test_status_of_several_tasks_without_a_default_one_omits_the_mirror_rows() -> None:
    s = _snapshot()
    s["model"], s["training"] = {}, {}
    out = cli.format_status(s)
    assert not any(line.startswith(("model ", "training ")) for line in out.splitlines())
    assert _row(out, "default") and _row(out, "churn")
    # an older daemon's snapshot (no tasks) reads as it always did
    old = {k: v for k, v in _snapshot().items() if k != "tasks"}
    out = cli.format_status(old)
    assert "TASK" not in out and _row(out, "model").split()[1:3] == ["mlp", "v7"]


def test_peers_shows_the_tasks_each_peer_runs_and_whether_ours_can_learn_with_it() -> None:
    out = cli.format_peers(_snapshot())
    header = out.splitlines()[0]
    assert "SCHEMA" not in header
    for col in ("DOMAIN", "STATE", "ADDRESS", "SOURCE", "LAST SEEN", "TASKS", "COMPATIBLE", "PEER ID"):
        assert col in header
    sales, support, hr = _row(out, "sales"), _row(out, "support"), _row(out, "hr")
    assert "churn,default" in sales and "default yes, churn ?" in sales and A[:16] in sales
    assert "default no: incompatible, churn no: unknown_task" in support
    assert "default ?, churn not in cohort" in hr
    # a single task: the compatibility alone, as the old column read
    s = _snapshot()
    del s["tasks"]["churn"]
    out = cli.format_peers(s)
    assert "  yes  " in _row(out, "sales") and "no: incompatible" in _row(out, "support")
    assert cli.format_peers({"mesh": {"peers": []}}) == "no peers known"


def test_peers_lists_addresses_proposed_but_not_verified() -> None:
    s = _snapshot()
    sales = s["mesh"]["peers"][0]
    sales["candidates"] = [
        {"address": sales["address"], "sources": ["mdns"], "verified": True, "recheck": False, "failures": 0},
        {"address": "10.6.6.6:7452", "sources": ["mdns"], "verified": False, "recheck": False, "failures": 3},
    ]
    out = cli.format_peers(s)
    assert "not verified by a signed pong" in out
    row = next(line for line in out.splitlines() if "10.6.6.6:7452" in line)
    assert row.split()[:4] == ["sales", "10.6.6.6:7452", "mdns", "3"]
    assert sales["address"] not in out.split("not verified")[1]  # the verified one is not listed there
    del sales["candidates"]
    assert "not verified" not in cli.format_peers(s)
