"""Subcommands of the ``fairnas`` CLI; each module defines ``register(subparsers)``."""
