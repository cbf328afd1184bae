"""Errors meant for the user: the CLI prints their message as one line and exits with status 2."""


class CCTError(Exception):
    """A problem with the user's input (file, flag, data), not a bug in cct."""


class CheckpointError(CCTError, ValueError):
    """A checkpoint or weights file that cannot be read, trusted or fitted to the model."""


class TrainingInterrupted(CCTError):
    """Training stopped early (a signal, or `stop_at_step`); `last.pt` holds where it stopped."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
