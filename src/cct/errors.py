"""Errors meant for the user: the CLI prints their message as one line and exits with status 2."""


class CCTError(Exception):
    """A problem with the user's input (file, flag, data), not a bug in cct."""


class CheckpointError(CCTError, ValueError):
    """A checkpoint or weights file that cannot be read, trusted or fitted to the model."""
