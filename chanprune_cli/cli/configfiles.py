"""The bridge between config files (project/config.py, which knows nothing of Click) and the
commands' options: config keys ↔ Click parameters, the settings as a command's `default_map`
(ranked below flags and above built-in defaults), and running a command in-process with them
(`chanprune run`)."""

from __future__ import annotations

import os
from typing import Any

import typer

from ..errors import UserError

try:  # typer >= 0.26 vendors click; older releases use the click package
    from typer._click.core import Context, ParameterSource
    from typer._click.exceptions import BadParameter
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.core import Context, ParameterSource
    from click.exceptions import BadParameter
    from click.globals import get_current_context

# Positional arguments have no option name; these are their config keys.
_ARGUMENT_KEYS = {"ckpt": "checkpoint"}
# Tables that configure something other than one command's options.
EXTRA_TABLES: dict[str, frozenset[str]] = {"run": frozenset({"dir", "stages"})}


def option_keys(command: Any) -> dict[str, Any]:
    """Config key → Click parameter for every option and argument of `command` (not --config/--debug)."""
    from ..project.config import normalise_key

    keys: dict[str, Any] = {}
    for param in command.params:
        if param.name in (None, "config", "debug"):
            continue
        if param.param_type_name == "argument":
            keys[_ARGUMENT_KEYS.get(param.name, param.name)] = param
        else:
            longs = [o for o in param.opts if o.startswith("--")]
            if longs:
                keys[normalise_key(longs[0][2:])] = param
    return keys


def configurable_commands(group: Any) -> dict[str, Any]:
    """Commands that read config files: those with a --config option other than `run` itself."""
    return {name: cmd for name, cmd in group.commands.items()
            if name != "run" and any(p.name == "config" for p in cmd.params)}


def command_keys(group: Any) -> dict[str, set[str]]:
    keys = {name: set(option_keys(cmd)) for name, cmd in configurable_commands(group).items()}
    keys.update({name: set(extra) for name, extra in EXTRA_TABLES.items()})
    return keys


def config_files(group: Any, explicit: str | None) -> list[Any]:
    """The discovered project config, then the --config file (ascending precedence)."""
    from ..project.config import discover, load_config

    tables = list(command_keys(group))
    files = [f for f in (discover(os.getcwd(), tables),) if f is not None]
    if explicit is not None:
        files.append(load_config(explicit, tables))
    return files


def command_settings(group: Any, name: str, explicit: str | None) -> dict[str, Any]:
    """Config key → config.Setting for command `name`."""
    from ..project.config import resolve

    return resolve(name, config_files(group, explicit), command_keys(group))


def default_map(command: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Click's default_map (parameter name → value as the option expects it) from settings."""
    from ..project.config import option_text

    params = option_keys(command)
    result: dict[str, Any] = {}
    for key, setting in settings.items():
        param = params[key]
        many = param.multiple or param.nargs == -1
        value = setting.value
        result[param.name] = (value if isinstance(value, list) else [value]) if many else option_text(value)
    return result


def check_settings(command: Any, settings: dict[str, Any]) -> None:
    """Convert every config value as Click converts the option (types, choices, ranges), so that a bad
    value fails before anything runs and the message names the key where it was set, not the option."""
    ctx = Context(command)
    params = option_keys(command)
    for key, setting in settings.items():
        param = params[key]
        try:
            param.process_value(ctx, default_map(command, {key: setting})[param.name])
        except BadParameter as exc:
            raise UserError(f"{setting.typed(key)} = {setting.value!r}: {exc.message}; fix the value "
                            f"(see 'chanprune {command.name} --help')") from None


def option_args(command: Any, args: list[str], settings: dict[str, Any]) -> list[str]:
    """The options `settings` give `command` on top of `args`, as a shell would type them: with `args`,
    the command line that does the same without the config files. Options in `args` win, so they are left out."""
    from ..project.config import option_text

    ctx = Context(command)
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    params = option_keys(command)
    extra: list[str] = []
    for key, setting in settings.items():
        param = params[key]
        if param.param_type_name == "argument" or given & {*param.opts, *param.secondary_opts}:
            continue
        name = next(o for o in param.opts if o.startswith("--"))
        value = param.process_value(ctx, default_map(command, {key: setting})[param.name])
        if param.is_flag:
            off = [o for o in param.secondary_opts if o.startswith("--")]
            extra += [name] if value else off[:1]
        elif param.multiple or param.nargs == -1:
            for item in setting.value if isinstance(setting.value, list) else [setting.value]:
                extra += [name, str(option_text(item))]
        else:
            extra += [name, str(option_text(setting.value))]
    return extra


def prefer_flags(**values: Any) -> dict[str, Any]:
    """For mutually exclusive options: when some are given as flags, drop the ones that came from a
    config file (a flag `--ratio` overrides `target_flops` in chanprune.toml). Keys: parameter names."""
    ctx = get_current_context()
    flagged = {k for k, v in values.items() if v is not None and ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
    if not flagged:
        return values
    return {k: (v if k in flagged or ctx.get_parameter_source(k) != ParameterSource.DEFAULT_MAP else None)
            for k, v in values.items()}


def given_as_flag(ctx: typer.Context, name: str) -> bool:
    """Whether parameter `name` was typed on the command line (not a default, not a config value)."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def config_argument(args: list[str]) -> str | None:
    """The value of --config in a subcommand's raw arguments (read before Click parses them)."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file: --config chanprune.toml")
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def invoke_command(ctx: typer.Context, name: str, args: list[str], settings: dict[str, Any]) -> Any:
    """Run subcommand `name` with `args` as if typed after `chanprune`, defaults from config `settings`
    (key → config.Setting, as `config.resolve` gives them)."""
    root = ctx.find_root()
    cmd = root.command.get_command(root, name)
    with cmd.make_context(name, list(args), parent=root, default_map=default_map(cmd, settings)) as sub:
        return cmd.invoke(sub)
