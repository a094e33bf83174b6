"""``--config FILE``: a TOML file of option defaults, checked key by key before any command runs."""

from __future__ import annotations

import click

from batchrun.endpoints import EndpointsError, parse_endpoints


def load_config(path: str, group: click.Group) -> dict:
    """A TOML config file as click's default_map for ``group``: top-level keys apply to every
    command that has such an option, a [command] table to that command only."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="'--config' (or BATCHRUN_CONFIG)") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    problems = config_problems(path, data, group.commands)
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint="--config")
    shared = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    default_map = {}
    for name, command in group.commands.items():
        params = {p.name: p for p in command.params}
        # A top-level key goes to the commands whose option takes its value (`tpm = ["m=N"]` is
        # run's --tpm, not mock-server's single number).
        entry = {k: _config_value(params[k], v) for k, v in shared.items()
                 if k in params and _config_check(command, k, v) is None}
        entry.update({k.replace("-", "_"): _config_value(params[k.replace("-", "_")], v)
                      for k, v in _section(data, name).items()})
        default_map[name] = entry
    return default_map


def _section(data: dict, command: str) -> dict:
    """A command's [command] table (`endpoints` is the [[endpoints]] array, not the command's table)."""
    section = data.get(command, {})
    return section if isinstance(section, dict) else {}


def _config_value(param: click.Parameter, value):
    """A config value as its option takes it: a repeatable option also takes one string
    (split on spaces, as its environment variable is) or one number."""
    if param.multiple and isinstance(value, str):
        return value.split()
    if param.multiple and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    return value


def _config_check(command: click.Command, key: str, value) -> str | None:
    """Why ``command``'s option ``key`` refuses ``value`` (None: it takes it, or has no such option)."""
    param = next((p for p in command.params if p.name == key.replace("-", "_") and p.name != "help"), None)
    if param is None:
        return None
    try:
        with click.Context(command) as ctx:
            cast = param.type_cast_value(ctx, _config_value(param, value))
            if param.callback is not None:  # the checks an option makes in its callback (--redis-url's)
                param.callback(ctx, param, cast)
    except click.BadParameter as exc:
        return exc.message
    except (TypeError, ValueError) as exc:  # a value of the wrong kind (a list for a number)
        return f"not a value --{param.name.replace('_', '-')} takes ({exc})"
    return None


def config_problems(path: str, data: dict, commands: dict[str, click.Command]) -> list[str]:
    """Every mistake of a config file, each naming the file and the key: an unknown section or
    key (with the close match, if any), or a value its option would refuse."""
    import difflib

    def unknown(what: str, key: str, known) -> str:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        return f"{path}: unknown {what} {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    def check(where: str, command: click.Command, key: str, value) -> str | None:
        problem = _config_check(command, key, value)
        return None if problem is None else f"{path}, {where}{key} = {value!r}: {problem}"

    option_names = {p.name for c in commands.values() for p in c.params if isinstance(p, click.Option)}
    out = []
    for key, value in data.items():
        if key == "endpoints":  # [[endpoints]]: the worker's endpoints (batchrun/endpoints.py checks them)
            out += endpoint_problems(path, value)
            continue
        if isinstance(value, dict):
            if key not in commands:
                out.append(unknown("section", f"[{key}]", [f"[{c}]" for c in commands]))
                continue
            mine = {p.name for p in commands[key].params if isinstance(p, click.Option)}
            for sub, v in value.items():
                if sub.replace("-", "_") not in mine:
                    out.append(unknown(f"key in [{key}]", sub, mine))
                else:
                    out.append(check(f"[{key}] ", commands[key], sub, v))
        elif key.replace("-", "_") not in option_names:
            out.append(unknown("key", key, option_names))
        else:  # a top-level key must fit one command that has it; the others do without it
            found = [check("", c, key, value) for c in commands.values()
                     if any(p.name == key.replace("-", "_") for p in c.params)]
            if all(found):
                out += found
    return list(dict.fromkeys(p for p in out if p))


def endpoint_problems(path: str, value) -> list[str]:
    try:
        parse_endpoints(path, value)
    except EndpointsError as exc:
        return exc.problems
    return []
