"""Validation results remembered by content, so the read-only commands skip pydantic.

`moectl status` and `moectl runs --json` get typed in loops, and importing pydantic and building
moectl's models costs ~0.1 s: more than all their real work (git, process scan, NVML). Validating
a file is a pure function of its bytes and of the code that validates it, so its result (the
model's JSON dump) is kept in a small memo under the user's cache directory, keyed by a hash of
the bytes. A file validated before is read back with `json` alone; a new or edited file, or any
change to moectl's or pydantic's code, goes through pydantic as always. Invalid files are never
remembered, so their errors are computed (and worded) by pydantic every time.

    memo = Memo("runs-" + digest(str(root)))   # one memo file per scope (an artifact root, a config path)
    data = memo.get(text)                       # the dump, or None: validate, then memo.put(text, dump)
    memo.save()                                 # written back only if it changed, atomically

The memo is only a cache: missing, unreadable, corrupt, from other code, or unwritable all mean
empty, and nothing fails because of it. Where it lives: $MOECTL_CACHE_DIR, else
$XDG_CACHE_HOME/moectl, else ~/.cache/moectl; files under `validated/`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Union

CACHE_ENV = "MOECTL_CACHE_DIR"
_MOECTL_DIR = Path(__file__).resolve().parent
# The code a validation result depends on: moectl's own modules (the models, their validators and
# the constants they default to), engine/schema.py (the metrics contract) and engine/config.py
# (the presets its constants come from), plus pydantic.
_ENGINE_SCHEMA = _MOECTL_DIR.parent / "engine" / "schema.py"
_ENGINE_CONFIG = _MOECTL_DIR.parent / "engine" / "config.py"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moectl"


try:  # blake2 itself: `hashlib` would first load OpenSSL's _hashlib (~2 ms of every start-up)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b


def digest(data: Union[str, bytes]) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return blake2b(data, digest_size=16).hexdigest()


def _stat_id(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return f"{path.name}:-"
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _pydantic_version_file() -> Optional[Path]:
    """pydantic's version.py, found without importing pydantic (a spec lookup is ~0.1 ms)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pydantic")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).parent / "version.py" if spec is not None and spec.origin else None


_FINGERPRINT: Optional[str] = None


def code_fingerprint() -> str:
    """Identity of the validating code: every module in moectl/ (not cli/: it validates nothing),
    engine/schema.py, engine/config.py and pydantic's version file, by name, size and mtime (an edit, a reinstall or
    an upgrade changes it), and the Python version. Conservative: any code change empties memos."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        parts = [sys.version]
        with os.scandir(_MOECTL_DIR) as entries:
            names = sorted(e.name for e in entries if e.name.endswith(".py"))
        parts += [_stat_id(_MOECTL_DIR / n) for n in names]
        parts += [_stat_id(_ENGINE_SCHEMA), _stat_id(_ENGINE_CONFIG)]
        pyd = _pydantic_version_file()
        parts.append(_stat_id(pyd) if pyd else "pydantic:-")
        _FINGERPRINT = digest("\n".join(parts))
    return _FINGERPRINT


class Memo:
    """One scope's remembered results: {digest of the bytes: the validated dump}, one JSON file.

    `save` keeps only the entries looked up or added since this Memo was opened, so a memo never
    outgrows what its scope holds now (the records of one artifact root, one config file)."""

    def __init__(self, scope: str) -> None:
        self.path = cache_dir() / "validated" / f"{scope}.json"
        self._entries: dict[str, Any] = {}
        self._used: set[str] = set()
        self._changed = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("code") == code_fingerprint() and isinstance(data.get("entries"), dict):
                self._entries = data["entries"]
        except (OSError, ValueError):
            pass  # no memo yet, or an unreadable one: start empty

    def get(self, content: Union[str, bytes]) -> Optional[Any]:
        key = digest(content)
        value = self._entries.get(key)
        if value is not None:
            self._used.add(key)
        return value

    def put(self, content: Union[str, bytes], value: Any) -> None:
        key = digest(content)
        self._entries[key] = value
        self._used.add(key)
        self._changed = True

    def save(self) -> None:
        """Write the memo back if anything was added or dropped. Never raises: a cache that cannot
        be written (read-only home, full disk) only means the next run validates again."""
        if not self._changed and self._used == set(self._entries):
            return
        from moectl.atomic import write_text_atomic

        kept = {k: v for k, v in self._entries.items() if k in self._used}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"code": code_fingerprint(), "entries": kept}))
        except OSError:
            return
        self._entries, self._changed = kept, False
