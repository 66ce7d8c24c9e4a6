"""``airflow cliniko ...``: the provider's CLI commands, for Airflow versions that load them (3.3+)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cliniko_provider.cli.commands import ARGUMENTS, DESCRIPTION, HELP

if TYPE_CHECKING:
    from airflow.cli.cli_config import CLICommand

FUNCTIONS = {"check": "check_command", "patients": "patients_command", "try-upload": "try_upload_command"}


def get_cliniko_cli_commands() -> list[CLICommand]:
    """Return the ``cliniko`` command group (named in the provider info's ``cli``)."""
    from airflow.cli.cli_config import ActionCommand, Arg, GroupCommand, lazy_load_command

    return [
        GroupCommand(
            name="cliniko",
            help=DESCRIPTION,
            subcommands=[
                ActionCommand(
                    name=name,
                    help=HELP[name],
                    func=lazy_load_command(f"cliniko_provider.cli.commands.{FUNCTIONS[name]}"),
                    args=[Arg(flags, **options) for flags, options in ARGUMENTS[name]],  # type: ignore[no-untyped-call]
                )
                for name in ARGUMENTS
            ],
        )
    ]
