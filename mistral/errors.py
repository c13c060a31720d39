"""Errors raised while reading a model's configuration or weights."""


class ConfigError(ValueError):
    """A config.json / params.json that does not describe a model we can run."""


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its configuration; the message names the tensor."""


class ModelNotFoundError(FileNotFoundError):
    """Neither a preset name nor a directory holding a checkpoint."""
