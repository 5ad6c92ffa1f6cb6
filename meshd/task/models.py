"""Model zoo and the flat-vector view of a model that gossip averages.

Built-in models are ``logreg``, ``mlp`` and ``cnn1d``; any ``package.module:factory`` entry point builds
a custom torch model.  A model is exchanged as one float64 vector (:func:`flatten` / :func:`load_flat`)
and two domains may merge only when their :func:`fingerprint` (architecture, parameter shapes and the task
kind, ``model.task``) agree.  Classification models have ``num_classes`` outputs; binary and regression
models one (:mod:`meshd.task.metrics`).

Why no BatchNorm in the built-ins: gossip averages every floating ``state_dict`` entry, and BatchNorm's
running mean/variance are statistics of one domain's (non-IID) data, not parameters; averaging them gives
normalisation statistics that match no domain's activations, and the integer ``num_batches_tracked``
counter cannot be averaged at all.  Custom models that use it still work (float buffers are averaged,
integer buffers are left local), but accuracy under non-IID data suffers; prefer GroupNorm/LayerNorm.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from meshd.errors import ModelError
from meshd.task.metrics import task_kind

__all__ = [
    "BUILTIN_MODELS",
    "ModelSpec",
    "build_model",
    "fingerprint",
    "flatten",
    "load_flat",
    "param_count",
    "state_dict_of",
]

BUILTIN_MODELS: tuple[str, ...] = ("logreg", "mlp", "cnn1d")


@dataclass(frozen=True)
class ModelSpec:
    """What model to build; validated on construction (raises :class:`ModelError`)."""

    name: str  # "logreg" | "mlp" | "cnn1d" | "package.module:factory"
    hidden: tuple[int, ...] = (64,)  # mlp hidden layer widths
    channels: tuple[int, ...] = (16, 32)  # cnn1d conv channels; first conv stride 1, the others stride 2
    kernel_size: int = 5  # cnn1d kernel size (odd keeps the sequence length with "same" padding)
    num_classes: int = 10
    task: str = "classification"  # model.task: "classification" (num_classes logits) | "binary" | "regression" (1)

    def __post_init__(self) -> None:
        # Config layers may hand over lists; normalise to tuples so the spec stays hashable.
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "channels", tuple(self.channels))
        if not isinstance(self.name, str) or not self.name:
            raise ModelError(f"model name must be a non-empty string, got {self.name!r}")
        if self.is_custom:
            module_name, _, attr = self.name.partition(":")
            if not module_name or not attr or ":" in attr:
                raise ModelError(f"custom model must be written 'package.module:factory', got {self.name!r}")
        elif self.name not in BUILTIN_MODELS:
            raise ModelError(
                f"unknown model {self.name!r}: use one of {', '.join(BUILTIN_MODELS)} or 'package.module:factory'"
            )
        for field, values in (("hidden", self.hidden), ("channels", self.channels)):
            if any(not _is_pos_int(v) for v in values):
                raise ModelError(f"model.{field} must hold positive integers, got {list(values)}")
        if self.name == "cnn1d" and not self.channels:
            raise ModelError("model.channels must name at least one conv layer for cnn1d")
        if not _is_pos_int(self.kernel_size):
            raise ModelError(f"model.kernel_size must be a positive integer, got {self.kernel_size!r}")
        if not _is_pos_int(self.num_classes) or self.num_classes < 2:
            raise ModelError(f"model.num_classes must be an integer >= 2, got {self.num_classes!r}")
        task_kind(self.task)  # raises ModelError naming model.task

    @property
    def outputs(self) -> int:
        """Width of the last layer: ``num_classes`` for classification, 1 for binary and regression."""
        return task_kind(self.task).outputs(self.num_classes)

    @property
    def is_custom(self) -> bool:
        return ":" in self.name


def build_model(spec: ModelSpec, input_dim: int, seed: int) -> nn.Module:
    """Build the model for ``input_dim`` features with weights drawn deterministically from ``seed``.

    Built-in models are created on the ``meta`` device and initialised with a private
    ``torch.Generator``, so the global torch RNG is neither read nor advanced.  A custom factory cannot
    be handed a generator, so it runs inside ``torch.random.fork_rng`` seeded with ``seed`` (the global
    state is restored afterwards; builds are serialised by a lock).
    """
    if not _is_pos_int(input_dim):
        raise ModelError(f"input_dim must be a positive integer, got {input_dim!r}")
    if spec.is_custom:
        return _build_custom(spec, input_dim, seed)
    gen = torch.Generator().manual_seed(int(seed))
    if spec.name == "logreg":
        module = _build_logreg(spec, input_dim)
    elif spec.name == "mlp":
        module = _build_mlp(spec, input_dim)
    else:
        module = _build_cnn1d(spec, input_dim)
    module = module.to_empty(device="cpu")
    _init_uniform(module, gen)
    return module


def initial_seed(spec: ModelSpec, input_dim: int, mesh_seed: int) -> int:
    """The seed of a mesh's initial weights: a function of the model spec, the input width and the mesh-wide
    ``model.init_seed`` only, never of the domain, so every domain starts from the very same model."""
    canonical = json.dumps(
        {"name": spec.name, "input_dim": int(input_dim), "hidden": list(spec.hidden),
         "channels": list(spec.channels), "kernel_size": spec.kernel_size, "mesh_seed": int(mesh_seed),
         **_task_fields(spec)},
        sort_keys=True, separators=(",", ":"),
    )
    return int.from_bytes(hashlib.sha256(canonical.encode("utf-8")).digest()[:8], "little") >> 1


def fingerprint(spec: ModelSpec, module: nn.Module, input_dim: int) -> str:
    """Architecture fingerprint: sha256 hex[:32] of the spec name, task, sizes and every shared entry's shape.

    Covers every floating ``state_dict`` entry (parameters and float buffers), i.e. exactly what
    :func:`flatten` exchanges, so equal fingerprints mean the flat vectors line up element by element, and the
    task kind (``model.task``): a binary model and a regression model of the same shape never merge.
    """
    entries = [[name, list(t.shape), str(t.dtype)] for name, t in _floating_entries(module)]
    canonical = json.dumps(
        {"name": spec.name, "input_dim": int(input_dim), "entries": entries, **_task_fields(spec)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def flatten(module: nn.Module) -> torch.Tensor:
    """A float64 1-D copy of every floating ``state_dict`` entry, concatenated in ``state_dict`` order."""
    parts = [t.detach().reshape(-1).to(dtype=torch.float64, device="cpu") for _, t in _floating_entries(module)]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)


def load_flat(module: nn.Module, vec: torch.Tensor) -> None:
    """Copy ``vec`` (the layout of :func:`flatten`) into the module in place; ``vec`` is not modified."""
    if not isinstance(vec, torch.Tensor) or vec.dim() != 1:
        got = tuple(vec.shape) if isinstance(vec, torch.Tensor) else type(vec).__name__
        raise ModelError(f"flat model vector must be a 1-D tensor, got {got}")
    if not vec.is_floating_point():
        raise ModelError(f"flat model vector must be floating point, got {vec.dtype}")
    entries = _floating_entries(module)
    expected = sum(t.numel() for _, t in entries)
    if vec.numel() != expected:
        raise ModelError(f"flat model vector has {vec.numel()} values, the model needs {expected}")
    offset = 0
    with torch.no_grad():
        for _, t in entries:
            n = t.numel()
            t.copy_(vec[offset : offset + n].view(t.shape))
            offset += n


def state_dict_of(module: nn.Module, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    """The module's ``state_dict`` with ``vec`` (the layout of :func:`flatten`) in place of its floating entries,
    as new float32 tensors: the module itself is neither read for values nor written (a training thread may
    be using it). Non-floating entries (counters) are copied as they are."""
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, t in module.state_dict().items():
        if not t.is_floating_point():
            out[name] = t.detach().clone()
            continue
        n = t.numel()
        if offset + n > vec.numel():
            raise ModelError(f"flat model vector has {vec.numel()} values, the model needs more")
        out[name] = vec[offset : offset + n].to(torch.float32).reshape(t.shape).contiguous()
        offset += n
    if offset != vec.numel():
        raise ModelError(f"flat model vector has {vec.numel()} values, the model needs {offset}")
    return out


def param_count(module: nn.Module) -> int:
    """Number of values the model shares (length of :func:`flatten`: parameters plus float buffers)."""
    return sum(t.numel() for _, t in _floating_entries(module))


# --------------------------------------------------------------------------------------------- helpers


_CUSTOM_BUILD_LOCK = threading.Lock()


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _task_fields(spec: ModelSpec) -> dict[str, object]:
    # A classification spec hashes exactly as before model.task existed (its checkpoints and its peers'
    # fingerprints stay valid); the other kinds hash their kind and output width instead of num_classes.
    if spec.task == "classification":
        return {"num_classes": spec.num_classes}
    return {"task": spec.task, "outputs": spec.outputs}


def _floating_entries(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # state_dict() tensors are detached views sharing storage with the module, so copy_ writes through.
    return [(name, t) for name, t in module.state_dict().items() if t.is_floating_point()]


def _build_logreg(spec: ModelSpec, input_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(input_dim, spec.outputs, device="meta"))


def _build_mlp(spec: ModelSpec, input_dim: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = input_dim
    for h in spec.hidden:
        layers += [nn.Linear(width, h, device="meta"), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, spec.outputs, device="meta"))
    return nn.Sequential(*layers)


def _build_cnn1d(spec: ModelSpec, input_dim: int) -> nn.Module:
    # The feature vector is one channel of length L (MNIST-1D: L=40).
    k = spec.kernel_size
    pad = k // 2
    layers: list[nn.Module] = [nn.Unflatten(1, (1, input_dim))]
    in_ch, length = 1, input_dim
    for i, out_ch in enumerate(spec.channels):
        stride = 1 if i == 0 else 2
        length = (length + 2 * pad - k) // stride + 1  # padding k // 2 keeps length >= 1
        layers += [nn.Conv1d(in_ch, out_ch, k, stride=stride, padding=pad, device="meta"), nn.ReLU()]
        in_ch = out_ch
    layers += [nn.Flatten(), nn.Linear(in_ch * length, spec.outputs, device="meta")]
    return nn.Sequential(*layers)


def _init_uniform(module: nn.Module, gen: torch.Generator) -> None:
    # PyTorch's default for Linear/Conv (kaiming_uniform with a=sqrt(5)) is U(-1/sqrt(fan_in), +1/sqrt(fan_in))
    # for both weight and bias; drawn here from a private generator.
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear | nn.Conv1d):
                fan_in = sub.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                sub.weight.uniform_(-bound, bound, generator=gen)
                if sub.bias is not None:
                    sub.bias.uniform_(-bound, bound, generator=gen)


def _build_custom(spec: ModelSpec, input_dim: int, seed: int) -> nn.Module:
    module_name, _, attr = spec.name.partition(":")
    try:
        mod = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"custom model {spec.name!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ModelError(f"custom model {spec.name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ModelError(f"custom model {spec.name!r}: {attr!r} is not callable")
    with _CUSTOM_BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        try:
            built = factory(input_dim=input_dim, num_classes=spec.outputs)
        except Exception as exc:
            raise ModelError(
                f"custom model {spec.name!r}: factory(input_dim={input_dim}, "
                f"num_classes={spec.outputs}) raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(built, nn.Module):
        raise ModelError(
            f"custom model {spec.name!r}: factory returned {type(built).__name__}, expected torch.nn.Module"
        )
    return built
