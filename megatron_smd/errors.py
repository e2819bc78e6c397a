"""User-facing errors.

Anything a user can cause (a bad config key, a malformed model directory, a corrupt rollout file,
a mask that fails validation) raises :class:`SMDError` with a message that names the file, key or
tensor. The CLI turns it into ``error: <message>`` on stderr and exit status 2; everything else is
a bug and keeps its traceback.
"""

from __future__ import annotations


class SMDError(Exception):
    """An error caused by the user's input, with a message meant to be read by them."""


class ConfigError(SMDError):
    """Invalid configuration: unknown key, wrong type, impossible combination."""


class MaskError(SMDError):
    """A shadow mask (``evict`` tensor) that violates its invariants."""


class FormatError(SMDError):
    """A file on disk (model directory, rollout file, checkpoint) that cannot be read as expected."""
