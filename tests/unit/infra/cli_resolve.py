"""Resolve a ``quotewatch …`` command line through the real click groups, without running it.

Used by the static checks of docker-compose.yml and of the local stack: a command a container or
the supervisor runs must exist, with those options, in the CLI (lazy commands included).
"""

from __future__ import annotations

import click

from quotewatch.cli import main as cli_main


def resolve_cli(args: list[str]) -> tuple[list[str], click.Command]:
    """Walk ``quotewatch ARGS`` through the click groups (lazy commands included) to the leaf
    command and parse its options and arguments exactly as the CLI would, without running it.

    Raises AssertionError naming the first word the CLI does not know.
    """
    command: click.Command = cli_main
    path = ["quotewatch"]
    rest = list(args)
    parent: click.Context | None = None
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1], parent=parent)
        assert rest, f"`{' '.join(path)}` is a group: the compose command names no sub-command"
        try:
            sub = command.get_command(ctx, rest[0])
        except ImportError as exc:
            raise AssertionError(f"`{' '.join([*path, rest[0]])}`: its module does not import: {exc}") from exc
        if sub is None:
            known = ", ".join(command.list_commands(ctx)) or "nothing yet"
            raise AssertionError(f"`{' '.join([*path, rest[0]])}` is not a command; `{' '.join(path)}` has: {known}")
        parent, command = ctx, sub
        path.append(rest.pop(0))
    try:
        command.make_context(path[-1], rest, parent=parent)
    except click.UsageError as exc:
        raise AssertionError(f"`{' '.join([*path, *rest])}`: {exc.format_message()}") from exc
    return path[1:], command
