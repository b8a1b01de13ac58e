"""The vlmfix error hierarchy.

Every error vlmfix raises on purpose derives from :class:`VlmfixError` and from the
builtin that best describes it, so ``except ValueError`` keeps working for callers who
do not know vlmfix. Messages name the parameter, the bad value and the fix.
"""

from __future__ import annotations


class VlmfixError(Exception):
    """Base class of every error raised by vlmfix on purpose."""


class UnsupportedModelError(VlmfixError, ValueError):
    """The model's architecture is not one vlmfix knows how to touch."""


class ConfigError(VlmfixError, ValueError):
    """A method or run configuration holds an invalid value."""


class ModelNotFoundError(VlmfixError, FileNotFoundError):
    """A model name or path could not be resolved to a checkpoint."""


class DataError(VlmfixError, ValueError):
    """Input data (question files, captions, annotations, images) is malformed."""


class StateError(VlmfixError, RuntimeError):
    """An operation was used in the wrong state (e.g. removing a handle twice)."""


class LayoutMismatchError(VlmfixError, RuntimeError):
    """Internal: the token layout vlmfix tracks does not match the keys of an attention call.

    Raised instead of running the call without the attached methods, which would silently
    turn every method off. Seeing it is a vlmfix bug (or an unsupported cache): please
    report it with the transformers version.
    """


class BackendUnavailableError(VlmfixError, RuntimeError):
    """An attention backend was forced where it cannot run (e.g. ``triton`` without CUDA)."""


class ShardError(VlmfixError, RuntimeError):
    """Another process of a sharded launch failed, or stopped answering.

    The records every process finished are kept in its part file; re-running the same
    command resumes the run."""
