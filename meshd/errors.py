"""The one error tree of meshd: every failure the project raises on purpose is a MeshdError."""

from __future__ import annotations


class MeshdError(Exception):
    """Root of every error meshd raises on purpose."""


class ConfigError(MeshdError):
    """The configuration is invalid; ``problems`` lists every one as ``key.path: what (got X)``."""

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(self.problems))


class IdentityError(MeshdError):
    """The identity key is missing, malformed or too widely readable."""


class WireError(MeshdError):
    """A message was rejected; ``reason`` is a short machine-readable tag, ``status`` the HTTP code."""

    def __init__(self, reason: str, status: int, detail: str = "") -> None:
        self.reason = reason
        self.status = status
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class DataError(MeshdError):
    """The domain's data product cannot be used (missing file, bad column, bad values)."""


class ModelError(MeshdError):
    """A model spec is invalid or a model cannot be built or loaded."""


class StoreError(MeshdError):
    """Persistent state cannot be written or read back."""
