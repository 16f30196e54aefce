"""Token streams for the engine: a built-in byte corpus, user files, or synthetic tokens.

    load_tokens("default")        the standard library's own .py sources, bytes as tokens (vocab 256)
    load_tokens("/some/dir")      every file under a directory, sorted by path, bytes as tokens;
                                  or, when its files are .bin shards (train_000.bin, ...), their tokens
    load_tokens("tokens.bin")     a flat little-endian uint16 token file (read with torch.frombuffer)
    "synthetic"                   random tokens, seeded per batch: SyntheticLoader

The default corpus needs no download: every Python install ships its standard library. Files are
read in sorted relative-path order and capped (DEFAULT_CAP_BYTES), so the corpus is deterministic
for a given Python version. The last HOLDOUT_FRAC of every corpus is the validation split.

Loaders hand each rank a disjoint part of the stream: micro-batch k of rank r is chunk
k * world_size + r, each chunk B*T+1 contiguous tokens (inputs and shifted targets). The only state
is k, identical on every rank, so a checkpoint stores it once and --resume continues exactly there.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from engine.config import BYTE_VOCAB, no_such_data, token_shards  # (shared with moectl's check before launch)

DEFAULT_CAP_BYTES = 4 * 1024 * 1024
HOLDOUT_FRAC = 0.05


def stdlib_sources(cap_bytes: int = DEFAULT_CAP_BYTES) -> bytes:
    """The stdlib's .py files (no site-packages: those differ per machine), sorted, capped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return _concat_files(root, lambda p: p.suffix == ".py", skip, cap_bytes)


def _concat_files(root: Path, keep, skip: set, cap_bytes: int) -> bytes:
    parts, size = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not keep(path) or not path.is_file():  # a FIFO or socket would block the read forever
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue  # unreadable file: skip, the corpus stays deterministic for readable ones
            parts.append(data)
            size += len(data)
            if size >= cap_bytes:
                return b"".join(parts)[:cap_bytes]
    return b"".join(parts)


def load_tokens(spec: str, cap_bytes: int = DEFAULT_CAP_BYTES) -> tuple[torch.Tensor, int]:
    """-> (1-D int32 token tensor, vocab size implied by the data). Raises ValueError when unusable."""
    if spec == "default":
        data = stdlib_sources(cap_bytes)
        return _bytes_to_tokens(data), BYTE_VOCAB
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = token_shards(path, spec)
        if shards:  # nanoGPT-style train_000.bin, ...: uint16 tokens, one after another
            tokens = torch.cat([_read_token_file(shard, f"{spec} ({shard.relative_to(path)})") for shard in shards])
            return tokens, max(2, int(tokens.max()) + 1)
        # (hidden files - .DS_Store, .gitignore - are no text of the corpus, as token_shards says)
        data = _concat_files(path, lambda p: not p.name.startswith("."), {"__pycache__"}, 1 << 40)
        if not data:
            raise ValueError(f"--data {spec}: directory holds no readable files")
        return _bytes_to_tokens(data), BYTE_VOCAB
    if path.is_file() and path.suffix == ".bin":
        tokens = _read_token_file(path, spec)
        # A one-token vocabulary has nothing to predict (and a model needs two outputs at least).
        return tokens, max(2, int(tokens.max()) + 1)
    if path.is_file():
        data = _read(path, spec)
        if not data:  # (torch.frombuffer's own words for it name no flag)
            raise ValueError(f"--data {spec}: empty file")
        return _bytes_to_tokens(data), BYTE_VOCAB
    if path.exists():  # a FIFO, socket or device: not read (a FIFO would block the run forever)
        raise ValueError(f"--data {spec}: not a regular file or directory")
    raise ValueError(no_such_data(spec))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # unreadable (permissions), a directory gone meanwhile: the user's to fix
        raise ValueError(f"--data {what}: cannot read it: {exc.strerror or exc}") from None


def _read_token_file(path: Path, what: str) -> torch.Tensor:
    raw = _read(path, what)
    if not raw:  # (torch.frombuffer has its own words for an empty buffer)
        raise ValueError(f"--data {what}: empty token file")
    if len(raw) % 2:
        raise ValueError(f"--data {what}: odd byte count, not a uint16 token file")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint16).to(torch.int32)


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)


def split(tokens: torch.Tensor, holdout_frac: float = HOLDOUT_FRAC) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = max(2, int(tokens.numel() * holdout_frac))
    return tokens[:-n_val], tokens[-n_val:]


class TokenLoader:
    """Micro-batches (x_BT, y_BT) from a 1-D token tensor; disjoint across ranks, resumable."""

    def __init__(self, tokens: torch.Tensor, B: int, T: int, rank: int = 0, world_size: int = 1, device="cpu"):
        self.tokens, self.B, self.T = tokens, B, T
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.n_chunks = (tokens.numel() - 1) // (B * T)
        if self.n_chunks < world_size:
            raise ValueError(
                f"data too small: {tokens.numel()} tokens give {max(self.n_chunks, 0)} batches of "
                f"{B}x{T}, fewer than the {world_size} rank(s)"
            )
        self.k = 0  # micro-batches drawn so far by each rank

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = (self.k * self.world_size + self.rank) % self.n_chunks
        self.k += 1
        start = chunk * self.B * self.T
        buf = self.tokens[start : start + self.B * self.T + 1].to(torch.int64)
        x_BT, y_BT = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        pin = self.device.type == "cuda"
        if pin:
            x_BT, y_BT = x_BT.pin_memory(), y_BT.pin_memory()
        return x_BT.to(self.device, non_blocking=pin), y_BT.to(self.device, non_blocking=pin)

    @property
    def epoch(self) -> int:
        return (self.k * self.world_size) // self.n_chunks

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])


class SyntheticLoader:
    """Random tokens for throughput work; batch k of rank r is seeded by (seed, r, k): resumable."""

    def __init__(self, vocab_size: int, B: int, T: int, seed: int = 0, rank: int = 0, world_size: int = 1, device="cpu"):
        self.vocab_size, self.B, self.T = vocab_size, B, T
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, torch.device(device)
        self.gen = torch.Generator()
        self.k = 0
        self.epoch = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.gen.manual_seed((self.seed * 1_000_003 + self.k * self.world_size + self.rank) & 0x7FFF_FFFF_FFFF_FFFF)
        self.k += 1
        buf = torch.randint(0, self.vocab_size, (self.B * self.T + 1,), generator=self.gen)
        x_BT, y_BT = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        pin = self.device.type == "cuda"  # pinned: the copy is truly async, no stall on the GPU queue
        if pin:
            x_BT, y_BT = x_BT.pin_memory(), y_BT.pin_memory()
        return x_BT.to(self.device, non_blocking=pin), y_BT.to(self.device, non_blocking=pin)

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])
