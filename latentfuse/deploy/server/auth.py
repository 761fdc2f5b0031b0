"""Client tokens: the server keeps only salted PBKDF2 hashes (clients.json); clients keep tokens.

A token is `lf<client id>.` followed by 256 random bits, so a guess is hopeless whatever the
hash; the salted PBKDF2 keeps a leaked clients.json from being usable. The prefix only says
which hash to check, so a request costs one key derivation at most; a token once accepted is
remembered by its sha256 for the life of the process, so valid requests cost none.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from latentfuse.deploy.server.persist import atomic_write_bytes

logger = logging.getLogger(__name__)

CLIENTS_FORMAT = 1
# A client id as the server reads it, in a token prefix or a URL: ASCII digits, no sign, no
# leading zero (so one id has one spelling), at most 9 digits.
CLIENT_ID = re.compile(r"(0|[1-9][0-9]{0,8})")
TOKEN_PREFIX = re.compile(r"lf(0|[1-9][0-9]{0,8})\.")


def parse_client_id(text: str) -> int | None:
    """The client id `text` spells strictly (see CLIENT_ID), else None."""
    return int(text) if CLIENT_ID.fullmatch(text) else None


KDF = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 20_000
TOKEN_BYTES = 32


@dataclass(frozen=True)
class Credential:
    """One client's salted token hash."""

    salt: bytes
    digest: bytes
    iterations: int

    def matches(self, token: str) -> bool:
        """Whether `token` hashes to this credential (constant-time comparison)."""
        derived = hashlib.pbkdf2_hmac("sha256", token.encode(), self.salt, self.iterations)
        return hmac.compare_digest(derived, self.digest)


def make_credential(token: str, iterations: int = DEFAULT_ITERATIONS) -> Credential:
    """A fresh salt and the hash of `token` under it."""
    salt = secrets.token_bytes(16)
    return Credential(
        salt, hashlib.pbkdf2_hmac("sha256", token.encode(), salt, iterations), iterations
    )


class TokenBook:
    """The clients a server knows and their credentials; checks a bearer token for a client id."""

    def __init__(
        self,
        credentials: dict[int, Credential],
        path: Path | None = None,
        declared: dict[int, tuple[str, ...]] | None = None,
    ):
        self.credentials = dict(credentials)
        # the class names each client declared when its token was issued (none: undeclared)
        self.declared = dict(declared or {})
        self._accepted: dict[int, bytes] = {}  # client id -> sha256 of a token already verified
        self._lock = threading.Lock()
        self.path: Path | None = path
        self._stamp = self._file_stamp()
        # An unknown id costs the same key derivation as a known one with a wrong token.
        self._decoy = make_credential(secrets.token_urlsafe(TOKEN_BYTES), self._iterations())

    def _iterations(self) -> int:
        counts = [c.iterations for c in self.credentials.values()]
        return max(counts) if counts else DEFAULT_ITERATIONS

    def _file_stamp(self) -> tuple | None:
        try:
            stat = self.path.stat() if self.path is not None else None
        except OSError:
            return None
        return None if stat is None else (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def refresh(self) -> bool:
        """Re-read clients.json if it changed on disk (a token issued, reissued or revoked while
        the server runs); the cache of accepted tokens is dropped. Whether it reloaded. A file
        that cannot be read keeps the current book (and says so)."""
        stamp = self._file_stamp()
        if self.path is None or stamp == self._stamp:
            return False
        try:
            fresh = TokenBook.load(self.path)
        except (OSError, ValueError) as error:
            logger.error("clients file %s not reloaded: %s", self.path, error)
            return False
        with self._lock:
            self.credentials, self._accepted, self._stamp = fresh.credentials, {}, stamp
            self.declared = fresh.declared
        logger.info("clients file %s reloaded: %d clients", self.path, len(self.credentials))
        return True

    @property
    def client_ids(self) -> list[int]:
        """The known client ids, sorted."""
        return sorted(self.credentials)

    def verified_before(self, client_id: int, token: str) -> bool:
        """Whether `token` is one already accepted for `client_id` (a hash lookup, no key
        derivation: cheap enough for the event loop)."""
        if not token:
            return False
        with self._lock:
            known = self._accepted.get(client_id)
        return known is not None and hmac.compare_digest(
            known, hashlib.sha256(token.encode()).digest()
        )

    def verify(self, client_id: int, token: str) -> bool:
        """Whether `token` is client `client_id`'s token (False for an unknown client)."""
        credential = self.credentials.get(client_id)
        if not token:
            return False
        if credential is None:  # same work and answer as a wrong token for a known client
            self._decoy.matches(token)
            return False
        quick = hashlib.sha256(token.encode()).digest()
        with self._lock:
            known = self._accepted.get(client_id)
        if known is not None and hmac.compare_digest(known, quick):
            return True
        if not credential.matches(token):
            return False
        with self._lock:
            if self.credentials.get(client_id) is not credential:  # reloaded meanwhile
                return False
            self._accepted[client_id] = quick
        return True

    @staticmethod
    def claimed_id(token: str) -> int | None:
        """The client id a token names in its `lf<id>.` prefix (unverified), else None."""
        match = TOKEN_PREFIX.match(token)
        return int(match.group(1)) if match else None

    def to_json(self) -> dict:
        """The clients.json payload (hashes and salts only)."""
        clients = {
            str(cid): {"salt": c.salt.hex(), "hash": c.digest.hex(), "iterations": c.iterations}
            for cid, c in sorted(self.credentials.items())
        }
        for cid, names in self.declared.items():
            if str(cid) in clients:
                clients[str(cid)]["classes"] = list(names)
        return {"format": CLIENTS_FORMAT, "kdf": KDF, "clients": clients}

    @classmethod
    def load(cls, path: str | os.PathLike) -> TokenBook:
        """Read clients.json; ValueError naming the file and the bad entry."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"clients file not found: {path} (create it with `latentfuse serve --make-tokens`)"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON: {error}") from None
        if (
            not isinstance(data, dict)
            or data.get("format") != CLIENTS_FORMAT
            or data.get("kdf") != KDF
        ):
            raise ValueError(f"{path}: expected format {CLIENTS_FORMAT} with kdf {KDF!r}")
        credentials, declared = {}, {}
        for key, entry in (data.get("clients") or {}).items():
            try:
                credentials[int(key)] = Credential(
                    bytes.fromhex(entry["salt"]),
                    bytes.fromhex(entry["hash"]),
                    int(entry["iterations"]),
                )
                if "classes" in entry:
                    names = entry["classes"]
                    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                        raise TypeError(f"classes must be a list of names, got {names!r}")
                    declared[int(key)] = tuple(names)
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"{path}: bad entry for client {key!r}: {error}") from None
        if not credentials:
            raise ValueError(f"{path} lists no clients")
        return cls(credentials, path, declared)


def issue_tokens(
    clients_file: str | os.PathLike,
    token_dir: str | os.PathLike,
    client_ids: Iterable[int],
    iterations: int = DEFAULT_ITERATIONS,
    declared: dict[int, tuple[str, ...]] | None = None,
) -> dict[int, Path]:
    """New tokens for `client_ids`: token files (mode 0600) and their hashes in clients.json,
    with the class names a client declares (`declared`: the only labels its releases may
    carry).

    Other clients already in clients.json keep their tokens; a listed client gets a new one.
    """
    clients_file, token_dir = Path(clients_file), Path(token_dir)
    book = TokenBook.load(clients_file) if clients_file.exists() else TokenBook({})
    token_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for client_id in sorted(set(client_ids)):
        if client_id < 0:
            raise ValueError(f"client ids must be >= 0, got {client_id}")
        token = f"lf{client_id}.{secrets.token_urlsafe(TOKEN_BYTES)}"
        path = token_dir / f"client-{client_id}.token"
        atomic_write_bytes(path, (token + "\n").encode(), mode=0o600)
        book.credentials[client_id] = make_credential(token, iterations)
        if declared and client_id in declared:
            book.declared[client_id] = tuple(declared[client_id])
        written[client_id] = path
    atomic_write_bytes(clients_file, json.dumps(book.to_json(), indent=2).encode(), mode=0o600)
    return written


def revoke_token(clients_file: str | os.PathLike, client_id: int) -> bool:
    """Remove `client_id`'s credential from clients.json (atomically): a running server re-reads
    the file and answers that client's token 401 from its next request. Returns whether the
    client was listed."""
    clients_file = Path(clients_file)
    book = TokenBook.load(clients_file)
    if client_id not in book.credentials:
        return False
    if len(book.credentials) == 1:
        raise ValueError(
            f"client {client_id} is the only client in {clients_file}: stop the server instead"
        )
    del book.credentials[client_id]
    atomic_write_bytes(clients_file, json.dumps(book.to_json(), indent=2).encode(), mode=0o600)
    return True
