"""`meshd export`: the model a domain serves, from its newest valid checkpoint, as a torch state_dict."""

from __future__ import annotations

from pathlib import Path

import torch

from meshd import config as configmod
from meshd import models
from meshd.errors import MeshdError
from meshd.store import CheckpointStore, export_state_dict


def export_model(config_path: Path, out: Path) -> Path:
    """Rebuild the configured model, load the newest valid checkpoint into it, save its state_dict."""
    from meshd.engine import Engine

    cfg = configmod.load(config_path.resolve())
    engine = Engine(cfg)
    warnings = engine.load()  # builds the model from the data product's schema and restores the checkpoint
    if engine.module is None or engine.pushsum is None:
        raise MeshdError("; ".join(warnings) or "no model configured")
    store = CheckpointStore(cfg.node.state_dir / "checkpoints", keep=cfg.checkpoint.keep)
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
