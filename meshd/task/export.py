"""`meshd export`: the model a domain serves, from its newest valid checkpoint, as a torch state_dict."""

from __future__ import annotations

from pathlib import Path

import torch

from meshd import config as configmod
from meshd.errors import MeshdError
from meshd.task import models
from meshd.task.checkpoints import CheckpointStore, export_state_dict


def export_model(config_path: Path, out: Path, task: str | None = None) -> Path:
    """Rebuild a task's model, load its newest valid checkpoint into it, save its state_dict.

    ``task`` names the task; it may be left out when the config runs exactly one.
    """
    from meshd.task.engine import Engine

    cfg = configmod.load(config_path.resolve())
    names = [t.name for t in cfg.tasks]
    if task is None and len(names) > 1:
        raise MeshdError(f"this domain runs {len(names)} tasks ({', '.join(names)}); pick one with --task NAME")
    chosen = next((t for t in cfg.tasks if task is None or t.name == task), None)
    if chosen is None:
        raise MeshdError(f"no task named {task!r} in {config_path}; its tasks: {', '.join(names)}")
    engine = Engine(chosen, cfg.node.state_dir, max_param_abs=cfg.limits.max_param_abs)
    warnings = engine.load()  # builds the model from the data product's schema and restores the checkpoint
    if engine.module is None or engine.pushsum is None:
        raise MeshdError("; ".join(warnings) or "no model configured")
    store = CheckpointStore(engine.state_dir / "checkpoints", keep=chosen.checkpoint.keep)
    ckpt, _ = store.load_latest()
    if ckpt is None:
        raise MeshdError(f"no valid checkpoint under {store.directory}; run the daemon first")
    if ckpt.fingerprint != engine.fingerprint:
        raise MeshdError(f"the newest checkpoint is for another model (fingerprint {ckpt.fingerprint[:12]})")
    served = ckpt.extra.get("served")
    values = ckpt.values
    if isinstance(served, bytes) and len(served) == 8 * int(values.numel()):
        values = torch.frombuffer(bytearray(served), dtype=torch.float64).clone()  # the model the domain serves
    models.load_flat(engine.module, values)
    export_state_dict(engine.module, out)
    return out
