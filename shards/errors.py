"""Errors a user can cause: the message says what went wrong, where, and how to fix it."""


class UserError(RuntimeError):
    """Bad input, missing data, unreachable storage, ...: reported as one clear message."""


class DataError(UserError):
    """A dataset root or shard set that cannot be used as configured."""


class StorageError(UserError):
    """Object storage that cannot be reached or written (endpoint, bucket, credentials)."""
