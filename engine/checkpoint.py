"""Checkpoints as nanochat writes them: `model_{step:06d}.pt` beside `meta_{step:06d}.json`.

The .pt holds what torch needs (model, optimizer, loader position, RNG states); the .json holds the
full config and loop state in plain JSON, so a run is auditable and resumable without unpickling.
`step` is the number of optimizer steps completed: resuming from model_000020.pt runs step 20 next.
Both files are written to a temporary name and renamed, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

import torch

_MODEL_RE = re.compile(r"^model_(\d{6,})\.pt$")


def save(ckpt_dir: str | Path, step: int, payload: dict, meta: dict) -> Path:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    model_path = ckpt_dir / f"model_{step:06d}.pt"
    meta_path = ckpt_dir / f"meta_{step:06d}.json"
    tmp = model_path.with_suffix(".pt.tmp")
    for dead in ckpt_dir.glob("*.tmp"):  # a save killed midway (SIGKILL: no cleanup ran) left its part
        _remove(dead)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, model_path)
        tmp = meta_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, meta_path)
    except BaseException as exc:  # Ctrl-C mid-save, a full disk: no half checkpoint left taking its space
        _remove(tmp)
        if isinstance(exc, (OSError, RuntimeError)):
            # torch's own words for a full disk are "[enforce fail at inline_container.cc] unexpected pos":
            # say what a person can act on
            raise CheckpointFailed(f"checkpoint {model_path.name} not saved in {ckpt_dir}: {_why(exc, ckpt_dir)}; "
                                   "the checkpoints before it are intact") from exc
        raise
    return model_path


def _remove(path: Path) -> None:
    """Best-effort removal of a part-written file. A read-only directory (EROFS even for a file that
    was never made) or a directory by that name must not replace the error being said with its own."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


class CheckpointFailed(Exception):
    """A checkpoint could not be written (a full disk, a directory gone): one line, no traceback."""


def _why(exc: BaseException, ckpt_dir: Path) -> str:
    import errno
    import shutil

    if getattr(exc, "errno", None) == errno.ENOSPC:
        return "no space left on the device"
    said = ((getattr(exc, "strerror", None) or str(exc)).strip().splitlines() or [type(exc).__name__])[0]
    try:
        low = shutil.disk_usage(ckpt_dir).free < (64 << 20)
    except OSError:
        low = False
    return f"no space left on the device ({said})" if low else said


def latest(ckpt_dir: str | Path) -> Optional[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _MODEL_RE.match(p.name))]
    return max(found)[1] if found else None


def resolve(resume: str, ckpt_dir: Optional[str]) -> Path:
    """--resume PATH|DIR|latest -> the model_*.pt to load. Raises ValueError with one line."""
    if resume == "latest":
        if not ckpt_dir:
            raise ValueError("--resume latest needs --ckpt-dir")
        path = latest(ckpt_dir)
        if path is None:
            raise ValueError(f"--resume latest: no model_*.pt in {ckpt_dir}")
        return path
    path = Path(resume).expanduser()
    if path.is_dir():
        found = latest(path)
        if found is None:
            raise ValueError(f"--resume {resume}: no model_*.pt in that directory")
        return found
    if not path.is_file():
        raise ValueError(f"--resume {resume}: no such checkpoint")
    return path


def load(path: Path) -> dict:
    """The checkpoint's contents. ValueError (one line) when its bytes changed since torch wrote them."""
    damaged = _damaged_member(path)
    if damaged is not None:
        raise ValueError(f"{damaged} fails its CRC-32 check: the file changed after it was saved "
                         "(a flipped bit, a partial copy); resume from an earlier checkpoint")
    # Our own files: optimizer state holds plain python objects, so weights_only is not enough.
    return torch.load(path, map_location="cpu", weights_only=False)


def _damaged_member(path: Path) -> Optional[str]:
    """The first member of torch's zip container whose bytes no longer match their CRC-32, or None.

    torch.load checks no checksum: a bit flipped in a tensor's storage (a bad disk, a copy cut and
    patched) resumed silently with one wrong weight. torch's writer does record each member's CRC,
    and zipfile's testzip reads them all back (about half a torch.load's time). A file that is not a
    zip (torch's legacy format, or no checkpoint at all) is left to torch.load to accept or refuse."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return None
