"""Client-side encryption at rest with age: the sidecar encrypts to public keys and never needs a private key
to back up; restore, verify and drills decrypt with ``AGE_IDENTITY_FILE``.

Why the ``age`` CLI (Debian's package, the reference Go implementation) as a pipeline stage rather than a
Python binding: it streams by design (64 KiB STREAM chunks, constant memory), runs on a core of its own beside
pg_dump and zstd, and is the very tool the stock one-liner uses, so what the sidecar writes is what operators
decrypt by hand (``age -d -i key.txt FILE | zstd -dc | pg_restore ...``). pyrage (the maintained binding)
encrypts whole ``bytes`` in memory, which breaks the constant-memory promise for a dump of any size.

Stored bytes, their size and their SHA-256 are of the ciphertext: integrity is checked without the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from app.errors import SidecarError
from app.manifest import Manifest
from app.proc import Child, filtered, run_short, scratch_env

log = logging.getLogger(__name__)

#: the suffix an encrypted artifact's key gets after its compression's (``dump.zst.age``)
SUFFIX = ".age"
SCHEME = "age"
_AGE_RECIPIENT = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
_SSH_RECIPIENT = re.compile(r"^(ssh-ed25519|ssh-rsa) [A-Za-z0-9+/]+={0,3}$")
_INSTALL_HINT = "install the age package (Debian/Ubuntu: apt-get install age)"


#: the identity file restore, verify and drills decrypt with: AGE_IDENTITY_FILE, set once by the CLI
_identity: Path | None = None


def use_identity(path: Path | None) -> None:
    """Set the identity the read path decrypts with (the CLI, from the loaded settings)."""
    global _identity
    _identity = path


def identity() -> Path | None:
    return _identity


class EncryptionError(SidecarError):
    """Encryption or decryption that cannot go on; the message names the backup, the hint the fix."""


@dataclass(frozen=True)
class EncryptionSettings:
    """BACKUP_ENCRYPT_RECIPIENTS(_FILE), BACKUP_ENCRYPT_TARGETS and AGE_IDENTITY_FILE."""

    recipients: tuple[str, ...] = ()
    identity_file: Path | None = None
    #: the targets whose copies are encrypted (BACKUP_ENCRYPT_TARGETS); None: every target
    targets: tuple[str, ...] | None = None

    @property
    def on(self) -> bool:
        return bool(self.recipients)

    def applies_to(self, target: str) -> bool:
        """Whether copies on ``target`` (``nas``, ``s3``) are encrypted."""
        return self.on and (self.targets is None or target in self.targets)


def parse_recipients(text: str, where: str) -> tuple[list[str], list[str]]:
    """Recipients (and problems) from a setting or an age recipients file: one per line or comma-separated,
    ``#`` comments and ssh key comments dropped. A private key pasted here is refused without echoing it."""
    found: list[str] = []
    problems: list[str] = []
    entries = [e.strip() for line in text.splitlines() if not line.strip().startswith("#")
               for e in line.split(",") if e.strip()]
    for n, entry in enumerate(entries, 1):
        if entry.upper().startswith("AGE-SECRET-KEY-") or "PRIVATE KEY" in entry:
            problems.append(f"{where}: entry {n} is a private key (an identity), not a recipient; it is not shown "
                            "here (hint: give its public key, `age-keygen -y KEYFILE`, and keep the private key "
                            "for AGE_IDENTITY_FILE on the machines that restore)")
            continue
        parts = entry.split()
        key = " ".join(parts[:2]) if parts and parts[0].startswith("ssh-") else entry
        if _AGE_RECIPIENT.match(key) or _SSH_RECIPIENT.match(key):
            found.append(key)
        else:
            problems.append(f"{where}: entry {n} ({entry[:12]}...) is not an age recipient (hint: an `age1...` "
                            "public key from `age-keygen -y`, or an ssh-ed25519/ssh-rsa public key)")
    return found, problems


def fingerprint(recipient: str) -> str:
    """What manifests and `list` show of a recipient: 16 hex digits of its SHA-256, never the key itself."""
    return hashlib.sha256(recipient.encode()).hexdigest()[:16]


def described(recipients: Sequence[str]) -> dict[str, object]:
    """The manifest's ``encryption`` field."""
    return {"scheme": SCHEME, "recipients": [fingerprint(r) for r in recipients]}


@functools.lru_cache(maxsize=8)
def identity_fingerprints(identity_file: Path) -> frozenset[str]:
    """Fingerprints of the recipients an age identity file opens (``age-keygen -y``); empty when it holds none
    that age-keygen can derive (an ssh private key: then only a decryption attempt can tell)."""
    try:
        done = run_short(["age-keygen", "-y", str(identity_file)], timeout=30)
    except FileNotFoundError as exc:
        raise EncryptionError("age-keygen is not installed", hint=_INSTALL_HINT) from exc
    if done.returncode != 0:
        return frozenset()
    return frozenset(fingerprint(line.strip()) for line in done.stdout.splitlines() if line.strip())


def check_identity(identity_file: Path | None, what: str) -> Path:
    """The identity file to decrypt ``what`` with, or an error that says which setting is missing."""
    if identity_file is None:
        raise EncryptionError(f"{what} is encrypted (age) and AGE_IDENTITY_FILE is not set",
                              hint="set AGE_IDENTITY_FILE to the identity file of one of its recipients "
                                   "(`list` shows their fingerprints)")
    if not identity_file.is_file():
        raise EncryptionError(f"AGE_IDENTITY_FILE={identity_file}: no such file",
                              hint="mount the identity file (a Secret) and point AGE_IDENTITY_FILE at it")
    return identity_file


# --- the manifest's sensitive fields ----------------------------------------------------------------------
#: what ``seal`` moves out of the clear: table names with their row counts, and the database's properties
#: (owner, ACL, settings, comment). Object counts stay readable: the output sanity check compares them.
def stripped(m: Manifest) -> Manifest:
    """``m`` without its sensitive fields (a failed manifest of an encrypted copy needs none of them)."""
    contents = {k: v for k, v in (m.contents or {}).items() if k != "rows"}
    return replace(m, contents=contents or None, database_properties=None, sealed=None)


def seal(m: Manifest, recipients: Sequence[str]) -> Manifest:
    """``m`` with its sensitive fields encrypted to ``recipients`` into ``sealed`` (an age-armored JSON)."""
    secret = {"rows": (m.contents or {}).get("rows"), "database_properties": m.database_properties}
    if secret["rows"] is None and secret["database_properties"] is None:
        return m
    try:
        done = run_short(_encrypt_argv(recipients, "--armor"), timeout=30, input=json.dumps(secret))
    except FileNotFoundError as exc:
        raise EncryptionError("age is not installed", hint=_INSTALL_HINT) from exc
    if done.returncode != 0:
        raise EncryptionError(f"age cannot seal the manifest of {m.id}: {done.stderr.strip()[:200]}",
                              hint="check BACKUP_ENCRYPT_RECIPIENTS")
    return replace(stripped(m), sealed=done.stdout)


_opened: dict[str, dict[str, object] | None] = {}


def opened(m: Manifest) -> Manifest:
    """``m`` with its sealed fields back, when AGE_IDENTITY_FILE opens them (else as it is: a reader without
    the key sees counts, never names). Each sealed text is opened once per process."""
    if not m.sealed or _identity is None:
        return m
    if m.sealed not in _opened:
        done = run_short(["age", "--decrypt", "-i", str(_identity)], timeout=30, input=m.sealed)
        try:
            secret = json.loads(done.stdout) if done.returncode == 0 else None
        except ValueError:
            secret = None
        if secret is None:
            log.debug("cannot open the sealed fields of %s: %s", m.id, done.stderr.strip()[:200])
        _opened[m.sealed] = secret
    secret = _opened[m.sealed]
    if not isinstance(secret, dict):
        return m
    contents = dict(m.contents or {})
    if secret.get("rows") is not None:
        contents["rows"] = secret["rows"]
    return replace(m, contents=contents or None, database_properties=secret.get("database_properties"))


def _encrypt_argv(recipients: Sequence[str], *extra: str) -> list[str]:
    """``age --encrypt`` to every recipient: public keys only, so argv may hold them."""
    return ["age", "--encrypt", *extra, *(arg for r in recipients for arg in ("-r", r))]


def encryptor(recipients: Sequence[str]) -> Child:
    """``age --encrypt`` as a filter process (app.pipeline feeds it the compressed stream and reads it)."""
    return Child(_encrypt_argv(recipients), scratch_env(), feeds=True, passes=True, name="age", hint=_INSTALL_HINT)


def decrypted(chunks: Iterable[bytes], identity_file: Path, what: str) -> Iterator[bytes]:
    """The plaintext of ``chunks`` (stored ciphertext), decrypted by ``age --decrypt -i FILE``; age checks every
    64 KiB chunk's tag, so a damaged or foreign stream fails instead of yielding garbage."""
    return filtered(Child(["age", "--decrypt", "-i", str(identity_file)], scratch_env(), feeds=True, passes=True,
                          name="age", hint=f"the identity in AGE_IDENTITY_FILE must be one of {what}'s recipients"),
                    chunks)
