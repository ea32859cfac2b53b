"""The base of every error that is the user's to fix (a config key, a file, a row, a checkpoint key).

`python -m recogdrive_jax.main` prints these as one `error: ...` line and exits 2; anything else is a bug and
keeps its traceback. Subclasses stay `ValueError`s, so library callers can catch either.
"""


class UserError(ValueError):
    pass


class CheckpointKeyError(UserError):
    """A checkpoint's keys or shapes do not match the model; the message lists every offender."""
