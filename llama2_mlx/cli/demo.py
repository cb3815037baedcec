"""CLI commands of this area (filled in as their issues land)."""

import click

COMMANDS: list[click.Command] = []
