"""A sweep spec: the TOML file that names a sweep's legs, validated whole before anything runs.

    spec = load_spec(Path("capacity.toml"))   # UsageError listing every problem as `<key>: <why>`
    spec.legs                                 # SweepLeg(tag, merged options), state pending

A spec has `name`, optional `notes` and `[common]` options, and either explicit `[[legs]]` or a
`[grid]` whose product becomes the legs (tags derived from the varied options: `static_cap1p0`).
`repeats = N` (in [common] or a leg) runs each such leg N times with seeds seed, seed+1, ...: N
legs of one tag, compared as one group (moectl.repeats).
Every leg's options go through the same validation as `moectl run`'s flags.
"""
from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from moectl.errors import UsageError
from moectl.plan import make_request, sanitize_tag
from moectl.records import SweepLeg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# Spec option -> accepted TOML types. Names are `moectl run`'s long options without dashes;
# `args` is the extra engine arguments (what `moectl run` takes after `--`).
OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "cap": (int, float), "compile": (str,), "fp8": (bool,), "dispatch": (str,), "steps": (int,),
    "preset": (str,), "device": (str,), "nproc": (int,), "seed": (int,), "args": (list,),
    "balance": (str,), "balance_rate": (int, float), "ep": (int,),
    "repeats": (int,),  # not a run option: the leg runs N times, seeds seed, seed+1, ... (one group)
}
TOP_KEYS = ("name", "notes", "common", "legs", "grid")
# Derived grid tags name the varied options in this order: compile before cap gives static_cap1p0.
TAG_ORDER = ("preset", "compile", "cap", "fp8", "dispatch", "balance", "balance_rate", "ep", "steps", "device", "nproc",
             "seed")


@dataclass
class SweepSpec:
    name: str
    legs: list[SweepLeg]  # tag + merged options (common < leg), state pending
    raw: dict[str, Any]  # the TOML as parsed: saved in sweep.json as `spec`
    notes: Optional[str] = None


def _type_name(types: tuple[type, ...]) -> str:
    return {(int, float): "a number", (str,): "a string", (bool,): "true or false", (int,): "an integer",
            (list,): "a list of strings"}[types]


def _check_option(key: str, value: Any, where: str, problems: list[str]) -> bool:
    """True when `key = value` is a known option of the right type; else one problem line, and
    the caller leaves the option out of what goes on to `make_request` (which would name it again)."""
    if key not in OPTION_TYPES:
        problems.append(f"{where}.{key}: unknown option (known: {', '.join(OPTION_TYPES)})")
        return False
    types = OPTION_TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and key == "args":
        ok = all(isinstance(a, str) for a in value)
    if not ok:
        problems.append(f"{where}.{key}: must be {_type_name(types)}, got {type(value).__name__} {value!r}")
    return ok


def _fmt_value(key: str, value: Any) -> str:
    if key == "cap":
        return "cap" + repr(float(value)).replace(".", "p")
    if key == "fp8":
        return "fp8" if value else "nofp8"
    if key == "balance":
        return f"bal{value}"
    if key in ("steps", "nproc", "ep", "seed"):
        return f"{key}{value}"
    return str(value)


def grid_tag(combo: dict[str, Any]) -> str:
    """`{"cap": 1.0, "compile": "static"}` -> `static_cap1p0`."""
    keys = sorted(combo, key=lambda k: TAG_ORDER.index(k) if k in TAG_ORDER else len(TAG_ORDER))
    joined = "_".join(_fmt_value(k, combo[k]) for k in keys)
    # "" for no options: the caller's own fallback (`leg{i}`), not sanitize_tag's "run" for every
    # such leg, which made two untagged legs differing in `args` duplicates of each other.
    return sanitize_tag(joined) if joined else ""


def request_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    kw = {k: v for k, v in options.items() if k not in ("args", "repeats")}
    kw["extra_args"] = list(options.get("args", []))
    return kw


# A sweep is run by a person and read as one table: a spec that expands to more legs than this is
# a typo (a grid axis with a range pasted in, `repeats = 100000`), refused before it is expanded in memory.
MAX_LEGS = 1000


def _repeated(tag: str, merged: dict[str, Any], where: str, problems: list[str],
              default_seed: Optional[int] = None) -> list[SweepLeg]:
    """A leg with `repeats = N` (its own or [common]'s) is N legs of one tag, seeds seed, seed+1, ...
    (seed: the leg's, else `default_seed` - the config's [defaults] seed, as `run --repeat` takes it
    (moectl.repeats.base_seed) - else 0, the engine's default); the sweep gives them one group when it runs."""
    n = merged.pop("repeats", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_LEGS:
        problems.append(f"{where}.repeats: must be an integer from 1 to {MAX_LEGS}, got {n!r}")
        return []
    if n == 1:
        return [SweepLeg(tag=tag, options=merged)]
    seed = merged.get("seed", default_seed if default_seed is not None else 0)
    return [SweepLeg(tag=tag, options={**merged, "seed": seed + k}, repeat=k + 1) for k in range(n)]


def parse_spec(data: dict[str, Any], source: str = "spec", default_seed: Optional[int] = None) -> SweepSpec:
    """Validate a parsed spec whole; UsageError listing every problem as `<key>: <why>`.
    `default_seed`: the config's [defaults] seed, the first seed of a repeated leg that names none."""
    problems: list[str] = []
    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"{key}: unknown key (known: {', '.join(TOP_KEYS)})")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        problems.append("name: required, a non-empty string")
        name = "sweep"
    elif sanitize_tag(name) != name:
        problems.append(f"name: {name!r} is not usable in a directory name (use letters, digits, . _ -)")
    notes = data.get("notes")
    if notes is not None and not isinstance(notes, str):
        problems.append("notes: must be a string")
    common = data.get("common", {})
    if not isinstance(common, dict):
        problems.append("common: must be a table of options")
        common = {}
    common = {k: v for k, v in common.items() if _check_option(k, v, "common", problems)}

    legs: list[tuple[str, str, dict[str, Any]]] = []  # (where, tag, leg-specific options)
    has_legs, has_grid = "legs" in data, "grid" in data
    if has_legs == has_grid:
        problems.append("legs/grid: give either [[legs]] or [grid]" + (", not both" if has_legs else ""))
    elif has_legs:
        raw_legs = data["legs"]
        if not isinstance(raw_legs, list) or not raw_legs or not all(isinstance(x, dict) for x in raw_legs):
            problems.append("legs: must be a non-empty list of [[legs]] tables")
            raw_legs = []
        for i, leg in enumerate(raw_legs):
            where = f"legs[{i}]"
            given = {k: v for k, v in leg.items() if k != "tag"}
            opts = {k: v for k, v in given.items() if _check_option(k, v, where, problems)}
            tag = leg.get("tag")
            if tag is None and len(opts) < len(given):
                tag = f"leg{i}"  # a tag from the options that passed could clash with another leg's
            elif tag is None:
                tag = grid_tag({k: v for k, v in opts.items() if k in TAG_ORDER}) or f"leg{i}"
            elif not isinstance(tag, str) or sanitize_tag(tag) != tag:
                problems.append(f"{where}.tag: {tag!r} is not usable in a directory name (use letters, digits, . _ -)")
                tag = f"leg{i}"
            legs.append((where, tag, opts))
    else:
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid:
            problems.append("grid: must be a table of option = [values]")
            grid = {}
        axes = {}  # option -> its values that passed: a bad one is reported once, not expanded
        for k, values in grid.items():
            if k in ("args", "repeats") or not isinstance(values, list) or not values:
                problems.append(f"grid.{k}: must be a non-empty list of values" if k not in ("args", "repeats")
                                else f"grid.{k}: {'engine args' if k == 'args' else 'repeats'} cannot be a grid "
                                     "axis; put them in [common]")
                continue
            good = [v for v in values if _check_option(k, v, "grid", problems)]
            if good:
                axes[k] = good
        size = math.prod(len(v) for v in axes.values())
        if size > MAX_LEGS:
            problems.append(f"grid: {' x '.join(str(len(v)) for v in axes.values())} = {size} legs, over {MAX_LEGS}")
            axes = {}
        for n, combo in enumerate(itertools.product(*axes.values()) if axes else ()):
            opts = dict(zip(axes, combo))
            legs.append((f"grid[{n}]", grid_tag(opts), opts))

    def repeats_of(opts: dict[str, Any]) -> int:  # a bad count is its leg's own problem, counted once
        n = {**common, **opts}.get("repeats", 1)
        return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_LEGS else 1

    total = sum(repeats_of(opts) for _, _, opts in legs)  # counted before anything is expanded
    if total > MAX_LEGS:
        problems.append(f"legs: {total} legs with their repeats, over {MAX_LEGS}")
        legs = []
    seen: dict[str, str] = {}
    out: list[SweepLeg] = []
    for where, tag, opts in legs:
        if tag in seen:
            problems.append(f"{where}.tag: duplicate tag {tag!r} (also {seen[tag]})")
            continue
        seen[tag] = where
        merged = {**common, **opts}
        try:  # the same validation as `moectl run`'s flags: one message per bad value
            make_request(tag=tag, **request_kwargs(merged))
        except UsageError as exc:
            for line in exc.lines or [exc.message]:
                opt, _, msg = line.partition(": ")
                key = opt.removeprefix("--").replace("-", "_")
                key = {"extra_args": "args", "engine args": "args"}.get(key, key)
                if not msg:
                    problems.append(f"{where}: {line}")
                elif where.startswith("grid[") and key in opts:  # name the axis and its bad value
                    problems.append(f"grid.{key}: {opts[key]!r}: {msg}")
                else:
                    problems.append(f"{where if key in opts else 'common'}.{key}: {msg}")
        # a bad [common] count is said once, as common's (the problems are de-duplicated below)
        out.extend(_repeated(tag, merged, where if "repeats" in opts else "common", problems, default_seed))
    if problems:
        problems = list(dict.fromkeys(problems))
        raise UsageError(f"invalid sweep spec {source} ({len(problems)} problem(s))", lines=problems)
    return SweepSpec(name=name, legs=out, raw=data, notes=notes)


def load_spec(path: Path, default_seed: Optional[int] = None) -> SweepSpec:
    path = Path(path).expanduser()
    if path.exists() and not path.is_file() and not path.is_dir():  # a FIFO: reading it waits for a writer forever
        raise UsageError(f"{path} is not a regular file (a pipe or device?): write the sweep spec to a file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM some editors write is not TOML
    except FileNotFoundError:
        raise UsageError(f"sweep spec not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read sweep spec {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path.name}: malformed TOML: {exc}") from None
    return parse_spec(data, path.name, default_seed)
