"""What the edges answer when a request cannot run: the error types the frontend raises, and which of Ray's and
Serve's errors mean that nothing can take a request now (503 with Retry-After / UNAVAILABLE, never 500)."""

import logging
import sys

from engine.errors import EngineDeadError

logger = logging.getLogger(__name__)


class ShardLost(Exception):
    """The shard running a request died; the request can be resumed on another."""


class OverloadedError(Exception):
    """Admission limits reached: retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModelError(LookupError):
    """The request names a model this server does not serve (404 / NOT_FOUND)."""


class UnavailableError(RuntimeError):
    """No shard can run the request now (503 with Retry-After / UNAVAILABLE); see `as_unavailable`."""



def as_unavailable(error: BaseException) -> UnavailableError | None:
    """`error` as an `UnavailableError` when it means that nothing can take the request now, else None.

    That is: the engine stopped (`EngineDeadError`), or Ray or Serve could not reach a replica — an actor
    that died or cannot be reached (`ServeShards` turns a shard's into `ShardLost` and resumes; any other
    lands here), a deployment that failed or a replica that went away. Both edges call this, so a request and
    the expert routes answer 503 / UNAVAILABLE for these, never 500 / INTERNAL. Ray's own messages name
    actors, pids and addresses, so only the error's type is passed on (and the whole error logged).
    """
    if isinstance(error, UnavailableError):
        return error
    if isinstance(error, EngineDeadError):
        return UnavailableError(str(error))
    if isinstance(error, _unreachable_errors()):
        logger.warning("a replica could not be reached: %r", error)
        return UnavailableError(f"the server cannot reach a replica to run the request now "
                                f"({type(error).__name__}); retry later")
    return None


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """Ray's and Serve's errors for a replica that cannot be reached; none while Ray is not loaded (then none
    of them can have been raised), so that the frontend runs without Ray."""
    if "ray" not in sys.modules:
        return ()
    from ray.exceptions import ActorUnschedulableError, NodeDiedError, RayActorError, WorkerCrashedError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, ActorUnschedulableError, NodeDiedError, WorkerCrashedError, DeploymentUnavailableError,
            ReplicaUnavailableError)


def first_line(error: BaseException) -> str:
    """The error's type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__
