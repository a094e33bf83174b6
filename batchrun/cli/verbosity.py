"""-q and -v wherever the user typed them: `batchrun run … -q` works as `batchrun -q run …`."""

from __future__ import annotations

import click


# -q, -v (also -vv, -qq) may come after the subcommand, as users type them: `batchrun run … -q`.
_VERBOSITY_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def lift_verbosity(group: click.Group, args: list[str]) -> list[str]:
    """``group``'s args with every verbosity flag moved before the subcommand (none after a `--`, none that is
    an option's value). Short flags run together lose their leading q/v: `-qo X` is `-q` and `-o X`."""
    lifted, rest = [], []
    command: click.Command = group
    value_next = False  # the token is the value of the option before it
    for i, arg in enumerate(args):
        if value_next:
            rest.append(arg)
            value_next = False
            continue
        if arg == "--":
            rest += args[i:]
            break
        if arg in _VERBOSITY_FLAGS:
            lifted.append(arg)
            continue
        if len(arg) > 2 and arg[0] == "-" and arg[1] in "qv":
            keep = arg[1:].lstrip("qv")
            lifted.append(arg[:len(arg) - len(keep)])
            if not keep:
                continue
            arg = "-" + keep
        if command is group and arg in group.commands:
            command = group.commands[arg]
        value_next = _takes_value(command, arg)
        rest.append(arg)
    return lifted + rest


def _takes_value(command: click.Command, token: str) -> bool:
    """Whether the token after ``token`` is the value of one of ``command``'s options."""
    if not token.startswith("-") or token == "-":
        return False
    opts = {name: p for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}

    def needs(p: click.Option) -> bool:
        return not p.is_flag and not p.count

    if token.startswith("--"):
        return token in opts and needs(opts[token])  # `--output=X` holds its value
    for j, ch in enumerate(token[1:], 1):  # -po: flags, then an option that takes the rest or the next token
        p = opts.get("-" + ch)
        if p is None:
            return False
        if needs(p):
            return j == len(token) - 1
    return False


