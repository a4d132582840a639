"""API keys: `genadapter keys add|revoke TENANT --keys-file PATH`, and the lookup the server does.

The keys file is JSON {"tenants": {tenant: [{"sha256": hex, "created": unix time}, ...]}}: only
hashes are stored, so a leaked file gives nobody a key. A key is 32 random bytes (urlsafe
base64, prefixed `ga-`), so a plain SHA-256 is enough (no password stretching needed for keys
nobody chose). The file is written atomically (temp, fsync, rename); the server reloads it when
it changes on disk, so `revoke` takes effect on a running server without a restart.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..state import atomic_write

TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # tenant ids name state files


def check_tenant(tenant: str) -> str:
    if not TENANT.fullmatch(tenant):
        raise ValueError(
            f"tenant {tenant!r} must be 1-64 of [A-Za-z0-9_.-], starting with a letter/digit"
        )
    return tenant


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def load_keys(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """{tenant: [key records]}; a missing file has no keys."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a genadapter keys file: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("tenants"), dict):
        raise ValueError(f"{path} is not a genadapter keys file")
    return data["tenants"]


def save_keys(path: str | Path, tenants: dict[str, list[dict[str, Any]]]) -> None:
    """Atomic write, readable by the owner only (it holds no key, but says who has one)."""
    text = json.dumps({"tenants": tenants}, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the keys file's folder: two `keys add` at once lose nothing."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def add_key(path: str | Path, tenant: str) -> str:
    """A new key for `tenant` (its other keys stay valid); returns the key, stores its hash."""
    check_tenant(tenant)
    key = "ga-" + secrets.token_urlsafe(32)
    with locked(path):
        tenants = load_keys(path)
        record = {"sha256": digest(key), "created": int(time.time())}
        tenants.setdefault(tenant, []).append(record)
        save_keys(path, tenants)
    return key


def revoke(path: str | Path, tenant: str) -> int:
    """Remove every key of `tenant`; returns how many there were."""
    with locked(path):
        tenants = load_keys(path)
        removed = len(tenants.pop(tenant, []))
        save_keys(path, tenants)
    return removed


class KeyStore:
    """The server's view of the keys file, reloaded whenever the file changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._hashes: list[tuple[bytes, str]] = []
        self._refresh()

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp == self._stamp and self._stamp is not None:
                return
            tenants = load_keys(self.path) if stamp is not None else {}
            self._hashes = [
                (bytes.fromhex(k["sha256"]), tenant) for tenant, ks in tenants.items() for k in ks
            ]
            self._stamp = stamp

    def tenant(self, key: str) -> str | None:
        """The tenant of `key`, or None. Every stored hash is compared in constant time, and the
        loop never stops early, so the time taken says nothing about which hash came close."""
        try:
            self._refresh()
        except (ValueError, OSError) as e:  # a broken file: keep the last good keys, say so
            print(f"warning: keys file {self.path}: {e}", file=sys.stderr)
        presented = bytes.fromhex(digest(key))
        found = None
        for stored, tenant in self._hashes:
            if hmac.compare_digest(stored, presented):
                found = tenant
        return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add", "revoke"], help="add: create and print a key")
    parser.add_argument("tenant", help="1-64 of [A-Za-z0-9_.-]; names the tenant's state file")
    parser.add_argument("--keys-file", required=True, metavar="PATH", help="JSON of key hashes")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "add":
            print(add_key(args.keys_file, args.tenant), flush=True)  # the only time it is shown
            return 0
        removed = revoke(args.keys_file, args.tenant)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"revoked {removed} key(s) of {args.tenant}", file=sys.stderr)
    return 0 if removed else 1
