"""Calling another component through either kind of handle: a Ray actor handle or a Serve deployment handle.

Both answer `handle.method.remote(*args)`, with an `ObjectRef` or a `DeploymentResponse`; both are awaitable,
so async code simply awaits. Threads that block (heartbeats, the engine's layer path) use `call`.
"""

import ray


def call(handle, method: str, *args, timeout_s: float | None = None):
    """Call `method` on the component behind `handle` and wait for its answer."""
    response = getattr(handle, method).remote(*args)
    if isinstance(response, ray.ObjectRef):
        return ray.get(response, timeout=timeout_s)
    return response.result(timeout_s=timeout_s)


def send(handle, method: str, *args) -> None:
    """Call `method` without waiting for the answer (a lost one is acceptable: load reports, session renewals)."""
    getattr(handle, method).remote(*args)
