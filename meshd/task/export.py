"""`meshd export`: the model a domain serves, from its newest valid checkpoint, as a torch state_dict, or (an
``--out`` ending in ``.safetensors``) as safetensors with the input scaler and the metadata serving needs.

The safetensors file holds the model's tensors under their state_dict names (float32), ``input.mean`` and
``input.std`` (one per input: the mesh's scaler with ``data.standardize = "mesh"``, else 0 and 1), and string
metadata: ``meshd.model``, ``meshd.task`` (classification, binary, regression), ``meshd.features`` (the
encoded input names in order, JSON), ``meshd.fingerprint``, ``meshd.version``. docs/data.md shows the ten
lines of torch and safetensors that score rows with it (logreg and mlp models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save as safetensors_save

from meshd import config as configmod
from meshd.errors import MeshdError
from meshd.store import atomic_write
from meshd.task import models
from meshd.task.checkpoints import CheckpointStore, export_state_dict

if TYPE_CHECKING:
    from meshd.task.engine import Engine


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
    if out.suffix != ".safetensors":
        export_state_dict(engine.module, out)
        return out
    atomic_write(out, safetensors_bytes(engine, values, {"meshd.version": str(ckpt.version)}), mode=0o600)
    return out


def safetensors_bytes(engine: Engine, values: torch.Tensor, meta: dict[str, str]) -> bytes:
    """The safetensors file of ``values`` (a flat model of ``engine``'s layout): the tensors under their
    state_dict names, the input scaler and the metadata (``meta`` added). Used by ``meshd export`` and by the
    daemon's ``GET /v1/model``; it neither reads nor writes ``engine.module``'s values (it may be training)."""
    assert engine.module is not None
    tensors = models.state_dict_of(engine.module, values)
    mean, std = torch.zeros(engine.input_dim, dtype=torch.float64), torch.ones(engine.input_dim, dtype=torch.float64)
    if engine.moments is not None and engine.moments.frozen is not None:
        mean, std = engine.moments.frozen.full(engine.input_dim)
    tensors["input.mean"], tensors["input.std"] = mean.to(torch.float32), std.to(torch.float32)
    product = engine.data if engine.data is not None else engine.test
    cfg = engine.cfg
    head = {"meshd.model": cfg.model.name, "meshd.task": cfg.model.task,
            "meshd.features": json.dumps(list(product.feature_names) if product is not None else []),
            "meshd.fingerprint": engine.fingerprint}
    return safetensors_save(tensors, metadata=head | meta)
