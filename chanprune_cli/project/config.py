"""Option defaults from TOML files.

A config file holds top-level keys shared by every command (`checkpoint`, `arch`, `data`, …) and one
table per command (`[prune]`, `[bench]`, …) for command-specific ones; keys are named like the
options (`arch_kwargs` or `arch-kwargs` for `--arch-kwargs`). Files come from two places:

* discovered: `chanprune.toml` in the working directory or the nearest parent, else a
  `[tool.chanprune]` table in the nearest `pyproject.toml`;
* explicit: `--config FILE`.

Precedence: flag > `--config FILE` > discovered file > built-in default; inside one file a command's
table beats the shared keys. Of options that exclude each other (`ratio`, `target_flops`,
`target_latency`; `criterion`, `scores`), one set by a file of higher precedence drops the others
set below it, as a flag drops them (so `--set prune.target_flops=0.5` over a file with `ratio`
switches the target). Relative paths in a file are relative to the file, so a project's
config works from any subdirectory. This module knows nothing about the CLI library: callers pass
the keys a command accepts.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROJECT_FILE = "chanprune.toml"
PYPROJECT_TABLE = ("tool", "chanprune")
# Discovery can be switched off, e.g. for scripts that must not depend on where they run.
NO_DISCOVERY_ENV = "CHANPRUNE_NO_PROJECT_CONFIG"

# Keys whose values are file paths: resolved against the config file's folder.
PATH_KEYS = frozenset({"checkpoint", "checkpoints", "data", "val_data", "scores", "teacher", "out", "json", "plot", "dir"})
# Options of which a command takes one: setting one at a higher precedence drops the others.
EXCLUSIVE_KEYS = (frozenset({"ratio", "target_flops", "target_latency"}), frozenset({"criterion", "scores"}))
# Data sources that are not files (see data.py) stay as written.
_NON_PATH_PREFIXES = ("synthetic:", "digits:")
_NON_PATH_NAMES = ("digits", "-")


@dataclass(frozen=True)
class ConfigFile:
    """One parsed config file: shared keys and per-command tables, paths already resolved."""

    path: Path
    label: str  # how `chanprune config` names it, e.g. "chanprune.toml" or "pyproject.toml [tool.chanprune]"
    shared: dict[str, Any]
    tables: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # "flag", "default", or where in which file
    origin: str = ""  # the file's label ("--set" for --set), "" for flags and defaults
    table: str | None = None  # the command table the key sits in; None for a shared key

    def typed(self, key: str) -> str:
        """The key as the user wrote it: `--set bench.calib_batches`, `ci.toml [bench] calib_batches`."""
        if self.origin == "--set":
            return f"--set {self.table}.{key}" if self.table else f"--set {key}"
        return f"{self.origin} [{self.table}] {key}" if self.table else f"{self.origin}: {key}"


def normalise_key(key: str) -> str:
    return key.strip().replace("-", "_")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; give a .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {path} is not valid TOML ({exc}); fix its syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read config file {path}: {exc}; check the file") from None


def _resolve_path(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_resolve_path(v, base) for v in value]
    if not isinstance(value, str) or value in _NON_PATH_NAMES or value.startswith(_NON_PATH_PREFIXES):
        return value
    expanded = os.path.expanduser(value)
    return expanded if os.path.isabs(expanded) else os.path.normpath(base / expanded)


def _normalised(table: Mapping[str, Any], base: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = normalise_key(key)
        out[name] = _resolve_path(value, base) if name in PATH_KEYS else value
    return out


def parse_config(document: Mapping[str, Any], path: Path, label: str, commands: Iterable[str]) -> ConfigFile:
    """Split a parsed TOML document into shared keys and command tables (tables named like a command)."""
    command_names = set(commands)
    base = path.parent
    shared: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in document.items():
        if key in command_names:
            if not isinstance(value, dict):
                raise UserError(f"{label}: '{key}' must be a table ([{key}]) of {key} options; fix the file")
            tables[key] = _normalised(value, base)
        else:
            shared.update(_normalised({key: value}, base))
    return ConfigFile(path=path, label=label, shared=shared, tables=tables)


def load_config(path: str | os.PathLike[str], commands: Iterable[str]) -> ConfigFile:
    p = Path(path)
    return parse_config(_read_toml(p), p, str(path), commands)


def discover(start: str | os.PathLike[str], commands: Iterable[str]) -> ConfigFile | None:
    """The nearest `chanprune.toml` (or pyproject.toml with [tool.chanprune]) from `start` upwards."""
    if os.environ.get(NO_DISCOVERY_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return None
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        candidate = folder / PROJECT_FILE
        if candidate.is_file():
            return parse_config(_read_toml(candidate), candidate, _display(candidate), commands)
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file():
            table: Any = _read_toml(pyproject)
            for part in PYPROJECT_TABLE:
                table = table.get(part) if isinstance(table, dict) else None
            if isinstance(table, dict):
                return parse_config(table, pyproject, f"{_display(pyproject)} [tool.chanprune]", commands)
    return None


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def resolve(command: str, files: list[ConfigFile], command_keys: Mapping[str, Iterable[str]]) -> dict[str, Setting]:
    """The settings `files` give `command` (lowest precedence first in `files`), keyed by option key.

    `command_keys`: the keys each command accepts. A key in a command's table that the command does
    not have, or a shared key no command has, is a typo: UserError naming it and the valid keys.
    """
    accepted = {name: set(keys) for name, keys in command_keys.items()}
    known = set().union(*accepted.values())
    settings: dict[str, Setting] = {}
    for f in files:
        for key in f.shared:
            if key not in known:
                raise UserError(f"{f.label}: unknown key '{key}'{_did_you_mean(key, known)}; keys are named like the "
                                "options (e.g. arch_kwargs for --arch-kwargs), see 'chanprune COMMAND --help'")
        for name, table in f.tables.items():
            for key in table:
                if key not in accepted.get(name, set()):
                    raise UserError(f"{f.label}: [{name}] has no option '{key}'{_did_you_mean(key, accepted.get(name, set()))}; "
                                    f"use one of: {', '.join(sorted(accepted.get(name, ())))}")
        given = {key: Setting(value, f.label, f.label) for key, value in f.shared.items() if key in accepted[command]}
        given.update({key: Setting(value, f"{f.label} [{command}]", f.label, command)
                      for key, value in f.tables.get(command, {}).items()})
        for group in EXCLUSIVE_KEYS:
            if group & given.keys():
                for dropped in group - given.keys():
                    settings.pop(dropped, None)
        settings.update(given)
    return settings


def _did_you_mean(key: str, choices: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def option_text(value: Any) -> Any:
    """A TOML value as the CLI option expects it: lists joined by commas, tables as JSON."""
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """`KEY=VALUE` or `TABLE.KEY=VALUE` (VALUE in TOML syntax, bare words taken as strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE or COMMAND.KEY=VALUE, got {text!r}; e.g. --set prune.ratio=0.3")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [normalise_key(k) for k in key.split(".")], value


def overrides(assignments: Iterable[str], commands: Iterable[str]) -> ConfigFile:
    """`--set` assignments as one more config file (relative paths relative to the working directory)."""
    document: dict[str, Any] = {}
    for text in assignments:
        keys, value = parse_assignment(text)
        table = document
        for part in keys[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise UserError(f"--set {text}: '{part}' is a value, not a table; set either it or its keys")
        table[keys[-1]] = value
    return parse_config(document, Path.cwd() / "--set", "--set", commands)
