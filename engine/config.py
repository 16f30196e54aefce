"""The engine's settings without torch: its presets, its defaults, and the model config with its
rules. engine.train resolves its command line with them; moectl checks a run's options with them
before anything is launched (`-- --top-k 9` beside 4 experts is a usage error, not a failed run),
and the CLI process never imports torch.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

PRESETS = {
    # CPU in seconds: loss on the byte corpus falls from ~5.5 to well under 3.5 within 40 steps.
    "tiny": dict(
        depth=2, aspect_ratio=32, head_dim=16, n_experts=4, top_k=2, expert_hidden_mult=2.0,
        moe_freq=1, cap=1.0, seq_len=64, device_batch_size=16, steps=40, lr=1e-2,
        data="default", compile="none",
    ),
    # The seed study's workload (see shared/seed/README.md): its shapes. Its FLOPs/token do not match
    # (ours 774.3M by nanochat's formula on active parameters; its MFU column implies ~958M), so compare
    # tok/s per GPU with the seed's runs, not MFU (docs/benchmarks.md, "GPU: one NVIDIA H200").
    "d12-moe": dict(
        depth=12, aspect_ratio=64, head_dim=64, n_experts=8, top_k=2, expert_hidden_mult=2.0,
        moe_freq=1, cap=1.0, balance_coeff=0.01, seq_len=1024, device_batch_size=16,
        total_batch_size=524288, steps=280, lr=3e-3, data="synthetic", vocab_size=32768,
        compile="static", dtype="bf16",
    ),
}

# torch.compile's modes (--compile-mode), each with whether it captures CUDA graphs (those need a
# step marker per micro-step in the training loop).
COMPILE_MODES = {"default": False, "reduce-overhead": True, "max-autotune": True, "max-autotune-no-cudagraphs": False}

# Used where neither the command line nor the preset sets a value.
DEFAULTS = dict(
    depth=4, aspect_ratio=64, head_dim=64, n_experts=8, top_k=2, expert_hidden_mult=2.0,
    moe_freq=1, cap=1.0, dispatch="auto", compile="none", compile_mode="default", fp8=False, fp8_dense=False, dense=False,
    balance_coeff=0.01, z_coeff=0.0, balance="loss", balance_rate=1e-3, ep=1, seq_len=256,
    device_batch_size=8, total_batch_size=None,
    steps=100, lr=3e-3, warmdown_frac=0.2, grad_clip=1.0, seed=0, data="default", vocab_size=None,
    device=None, dtype=None, out_dir=None, ckpt_dir=None, save_every=0, resume=None,
    peak_flops=None, eval_every=0, eval_batches=8, log_every=1,
)


@dataclass
class GPTConfig:
    depth: int = 12
    aspect_ratio: int = 64
    head_dim: int = 64
    seq_len: int = 1024
    vocab_size: int = 32768
    n_experts: int = 8
    top_k: int = 2
    expert_hidden_mult: float = 2.0  # expert hidden = mult * dim
    moe_freq: int = 1
    cap: float = 1.0  # capacity factor; 0 = dropless
    dispatch: str = "auto"
    balance_coeff: float = 0.01
    z_coeff: float = 0.0
    balance: str = "loss"  # loss (Switch loss) | bias (aux-loss-free, DeepSeek-V3) | none
    balance_rate: float = 1e-3
    dense: bool = False  # iso-FLOP dense baseline: every MoE MLP -> dense MLP of top_k * expert_hidden
    fp8: bool = False  # float8 expert GEMMs (engine.fp8 via MoEConfig.fp8)
    fp8_dense: bool = False  # float8 for the dense Linear layers (attention, dense MLPs)
    softcap: float = 15.0

    # Derived sizes: one knob (depth) moves width and heads together.
    @property
    def n_layer(self) -> int:
        return self.depth

    @property
    def dim(self) -> int:
        return self.depth * self.aspect_ratio

    @property
    def n_head(self) -> int:
        return self.dim // self.head_dim

    @property
    def expert_hidden(self) -> int:
        return int(self.expert_hidden_mult * self.dim)

    @property
    def dense_hidden(self) -> int:
        """Hidden size of a dense MLP: 4x dim (nanochat) for ordinary dense layers."""
        return 4 * self.dim

    @property
    def padded_vocab(self) -> int:
        # A multiple of 64 keeps the lm_head GEMM on fast tensor-core shapes; extra rows are never targets.
        return (self.vocab_size + 63) // 64 * 64

    def is_moe_layer(self, i: int) -> bool:
        return not self.dense and i % self.moe_freq == self.moe_freq - 1

    def was_moe_layer(self, i: int) -> bool:
        """Whether layer i is MoE in the MoE twin of this config (where --dense puts its iso-FLOP MLP)."""
        return i % self.moe_freq == self.moe_freq - 1

    def validate(self) -> None:
        """Raise ValueError with one readable line for the first bad setting."""
        if self.depth < 1:
            raise ValueError(f"--depth must be >= 1, got {self.depth}")
        if self.aspect_ratio < 1 or self.head_dim < 1:
            raise ValueError("--aspect-ratio and --head-dim must be >= 1")
        if self.dim % self.head_dim != 0:
            raise ValueError(f"dim {self.dim} (depth x aspect ratio) is not a multiple of --head-dim {self.head_dim}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"--head-dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_experts < 1:
            raise ValueError(f"--n-experts must be >= 1, got {self.n_experts}")
        if self.top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {self.top_k}")
        if self.top_k > self.n_experts:
            raise ValueError(f"--top-k {self.top_k} is larger than --n-experts {self.n_experts}")
        if self.cap < 0:
            raise ValueError(f"--cap must be >= 0 (0 = dropless), got {self.cap}")
        if self.moe_freq < 1:
            raise ValueError(f"--moe-freq must be >= 1, got {self.moe_freq}")
        if not self.dense and self.moe_freq > self.depth:
            # No layer i < depth has i % freq == freq - 1: every MLP would be dense, and the run a dense
            # model under MoE options (its router, caps and balance figures all empty), without a word.
            raise ValueError(f"--moe-freq {self.moe_freq} over --depth {self.depth} makes no MoE layer (layer i is "
                             "MoE when i % freq == freq - 1): use --moe-freq <= --depth, or --dense for a dense model")
        if self.expert_hidden < 1:
            raise ValueError(f"--expert-hidden-mult gives expert hidden {self.expert_hidden}; must be >= 1")
        if self.dispatch not in ("auto", "padded", "grouped", "loop"):
            raise ValueError(f"--dispatch must be auto|padded|grouped|loop, got {self.dispatch!r}")
        if self.balance not in ("loss", "bias", "none"):
            raise ValueError(f"--balance must be loss|bias|none, got {self.balance!r}")
        if not self.balance_rate > 0:
            raise ValueError(f"--balance-rate must be > 0, got {self.balance_rate}")
        if self.seq_len < 1 or self.vocab_size < 2:
            raise ValueError("--seq-len must be >= 1 and --vocab-size >= 2")
        # Sizes no machine holds: said here (moectl asks this before launch, torch-free), not as
        # torch's "Overflow when unpacking long long" traceback, nor after a minute of building it.
        params = self.approx_params()
        if params > MAX_PARAMS:
            raise ValueError(f"the model would have about {params:.3g} parameters (--depth, --aspect-ratio, "
                             f"--n-experts, --expert-hidden-mult, --vocab-size): more than {MAX_PARAMS:.0e}, which no "
                             "machine holds")

    def approx_params(self) -> float:
        """The model's weights, roughly (attention 4 dim^2 a layer, its MLP, the embedding and the
        head), as a float: absurd options give a huge number here, never an overflow."""
        dim, depth = float(self.dim), float(self.depth)
        moe_layers = 0.0 if self.dense else float(self.depth // self.moe_freq)
        expert = 2.0 * dim * float(self.expert_hidden_mult) * dim  # up and down projections
        dense_mlp = 2.0 * dim * (self.top_k * float(self.expert_hidden_mult) * dim if self.dense else 4.0 * dim)
        return depth * 4.0 * dim * dim + moe_layers * self.n_experts * (expert + dim) \
            + (depth - moe_layers) * dense_mlp + 2.0 * self.vocab_size * dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(dim=self.dim, n_head=self.n_head, n_layer=self.n_layer, expert_hidden=self.expert_hidden)
        return d


MAX_PARAMS = 1e13  # ~40 TB in fp32 weights alone: far past any node, far below an overflow

BYTE_VOCAB = 256  # engine.data: text as bytes (the default corpus, a directory, any non-.bin file)


EMPTY_DATA = "--data must not be empty (a path, `default` or `synthetic`)"  # (engine.train and moectl)


def no_such_data(spec: str) -> str:
    """What engine.data (and moectl before launch) says of a --data that names nothing."""
    return f"--data {spec}: no such file or directory (use 'default', 'synthetic', a directory or a .bin file)"


def token_shards(directory: Path, spec: str) -> list[Path]:
    """The .bin token files of a `--data` directory, sorted (nanoGPT-style shards: train_000.bin, ...),
    or [] when it holds none (a directory of text, read as bytes). ValueError when it mixes the two:
    either reading would be wrong for half of it."""
    bins, others = [], 0
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.startswith(".") or not path.is_file():
                continue  # hidden files, FIFOs and sockets are never data
            if path.suffix == ".bin":
                bins.append(path)
            else:
                others += 1
    if bins and others:
        raise ValueError(f"--data {spec}: mixes {len(bins)} .bin token file(s) with {others} other file(s); "
                         "a directory is either token shards or text")
    return bins


def check_data_options(options: Mapping[str, Any], cwd: Path) -> None:
    """ValueError (one line) for a `--data` engine.data would refuse before training - a path that
    is not there, seen from `cwd` where the engine runs - or a `--vocab-size` below a byte corpus's
    256. Reads no data (a .bin's own vocabulary is the engine's to check)."""
    preset = PRESETS[options.get("preset") or "tiny"]
    if options.get("data") == "":
        raise ValueError(EMPTY_DATA)
    spec = options.get("data") or preset.get("data", DEFAULTS["data"])
    if spec in ("default", "synthetic"):
        path = None
    else:
        path = Path(str(spec)).expanduser()
        path = path if path.is_absolute() else Path(cwd) / path
        if not path.exists():
            raise ValueError(no_such_data(str(spec)))
        if not (path.is_file() or path.is_dir()):  # engine.data never reads a FIFO, socket or device
            raise ValueError(f"--data {spec}: not a regular file or directory")
    shards = token_shards(path, str(spec)) if path is not None and path.is_dir() else []
    vocab = options.get("vocab_size")
    byte_data = spec == "default" or (path is not None and not (path.is_file() and path.suffix == ".bin") and not shards)
    if vocab and byte_data and vocab < BYTE_VOCAB:
        raise ValueError(f"--vocab-size {vocab} is smaller than the data's ({BYTE_VOCAB})")


def check_model_options(options: Mapping[str, Any]) -> None:
    """ValueError (one line, the engine's own) when these engine options, over their preset and the
    defaults as engine.train fills them in, make no valid model: what `engine.train` would refuse
    with exit 2 after torchrun started. Options it does not know are ignored here."""
    preset = PRESETS[options.get("preset") or "tiny"]
    settings = {}
    for f in fields(GPTConfig):
        value = options.get(f.name)
        if value is None:
            value = preset.get(f.name, DEFAULTS.get(f.name, f.default))
        settings[f.name] = value
    if settings["vocab_size"] is None:
        settings["vocab_size"] = 256  # the byte corpus's, as engine.train when data gives none
    cfg = GPTConfig(**settings)
    cfg.validate()
    check_compile_mode(options.get("compile") or preset.get("compile", DEFAULTS["compile"]),
                       options.get("compile_mode") or DEFAULTS["compile_mode"])


def check_compile_mode(compile: str, mode: str) -> None:
    """ValueError when --compile-mode is given without anything to compile."""
    if mode != "default" and compile == "none":
        raise ValueError(f"--compile-mode {mode} needs --compile static or dynamic")

