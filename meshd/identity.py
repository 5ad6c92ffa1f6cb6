"""A domain's identity: one Ed25519 key; its X25519 box key derives from it; peer id = public key as hex.

Key files hold the 32-byte seed as hex with a comment line, mode 0600.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from meshd.errors import IdentityError

PEER_ID_HEX_LEN = 64
_HEADER = "# meshd identity: Ed25519 seed (hex). Secret: keep mode 0600, never share.\n"


@dataclass(frozen=True)
class Identity:
    """A domain's signing key plus the X25519 keys derived from it."""

    signing_key: SigningKey

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key (what peers trust)."""
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    @property
    def box_private(self) -> PrivateKey:
        return self.signing_key.to_curve25519_private_key()

    def __repr__(self) -> str:  # never print key material
        return f"Identity(peer_id={self.peer_id!r})"


def generate() -> Identity:
    return Identity(SigningKey.generate())


def peer_id_of(public_key: bytes) -> str:
    return public_key.hex()


def parse_peer_id(text: str) -> bytes:
    """Peer id text -> 32 raw bytes; raises ValueError with a reason."""
    t = text.strip().lower()
    if len(t) != PEER_ID_HEX_LEN:
        raise ValueError(f"a peer id is {PEER_ID_HEX_LEN} hex characters, got {len(t)}")
    try:
        raw = bytes.fromhex(t)
    except ValueError:
        raise ValueError("a peer id is hex (0-9, a-f)") from None
    try:
        VerifyKey(raw)
        # Also a point of the prime-order group (what sealing to it needs): most mistyped ids are not, so a
        # typo is caught here instead of failing every message to that peer.
        crypto_sign_ed25519_pk_to_curve25519(raw)
    except Exception:
        raise ValueError("not a valid Ed25519 public key") from None
    return raw


def box_public_of(public_key: bytes) -> PublicKey:
    """The X25519 box public key of a peer, derived from its Ed25519 public key."""
    return VerifyKey(public_key).to_curve25519_public_key()


def save(identity: Identity, path: Path, *, force: bool = False) -> None:
    """Write the key file with mode 0600; refuses to replace an existing file unless ``force``."""
    if path.exists() and not force:
        raise IdentityError(f"{path} already exists; refusing to overwrite a key (use --force to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (_HEADER + bytes(identity.signing_key).hex() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load(path: Path) -> Identity:
    """Read a key file; errors name the file and the fix."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"identity key {path} does not exist; create one with `meshd keygen --out {path}` "
            "or `meshd init`"
        ) from None
    if st.st_uid != os.geteuid():
        # As OpenSSH does: a key someone else owns may have been planted or swapped by them.
        raise IdentityError(
            f"identity key {path} is owned by uid {st.st_uid}, not by the user running meshd (uid {os.geteuid()}); "
            f"fix with `chown {os.geteuid()} {path}` (or run meshd as its owner)"
        )
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"identity key {path} is readable by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"fix with `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IdentityError(f"identity key {path} cannot be read ({type(exc).__name__}); "
                            "regenerate it with `meshd keygen`") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    try:
        if len(lines) != 1:
            raise ValueError
        seed = bytes.fromhex(lines[0])
        if len(seed) != 32:
            raise ValueError
    except ValueError:
        raise IdentityError(
            f"identity key {path} is malformed (expected one line of 64 hex characters); "
            f"regenerate it with `meshd keygen --out {path} --force`"
        ) from None
    return Identity(SigningKey(seed))
