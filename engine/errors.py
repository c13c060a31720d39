"""Typed errors for bad requests.

Every error a user can cause is an `InvalidRequestError`: the serving edge maps it to HTTP 400 (or gRPC
INVALID_ARGUMENT) with its message, which always says what is allowed. `param` names the offending field
in OpenAI's vocabulary so the edge can fill the error's `param`.
"""


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message says what to change."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class SamplingParamsError(InvalidRequestError):
    """A sampling parameter outside its allowed range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus what must be generated) does not fit the model's context."""


class ChatTemplateError(InvalidRequestError):
    """Chat messages that the instruct format rejects (roles out of order, empty content, ...)."""


class EngineConfigError(ValueError):
    """Engine settings that cannot work together (e.g. a KV cache too small for one full-length sequence)."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped on an internal error; every in-flight and later request fails with this."""
