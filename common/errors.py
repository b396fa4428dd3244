"""Named exceptions shared by every stamen package.

The CLI turns any ``StamenError`` into one clear message and a non-zero exit, so
code raises these (with a message that names the problem) instead of letting a
library traceback reach the user.
"""


class StamenError(Exception):
    """Base class for errors a user can fix (bad config, bad data, bad state)."""


class ConfigError(StamenError):
    """A run-config or node-config value is missing, unknown or out of range."""


class DataError(ConfigError):
    """A dataset spec, file or partitioning request cannot be honoured (bad input, so a ConfigError)."""


class StateError(StamenError):
    """A site state store or checkpoint is unreadable or from another schema."""
