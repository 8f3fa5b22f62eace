"""Exceptions of our own: each message names the file, tensor or flag and what to do."""


class EfError(Exception):
    """Base class: anything efengine reports to a user as a clear one-line error."""


class FormatError(EfError):
    """A .ef file is not what it should be (foreign, truncated, corrupt, newer version)."""


class ConfigError(EfError):
    """A model configuration or an option is invalid or unsupported."""


class CheckpointError(EfError):
    """A source checkpoint (HF folder, safetensors, GGUF) cannot be converted."""
