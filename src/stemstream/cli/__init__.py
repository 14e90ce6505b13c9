"""The command line: one module per family of commands, plain functions registered on one typer app."""

from stemstream.cli.app import app, main

__all__ = ["app", "main"]
