"""The Ingress role: the HTTP (OpenAI-compatible, through Serve's proxy) and gRPC (its own server) edge over one
`Frontend` (validation, admission limits, resuming a request on another shard when its shard dies), and
`ServeShards`, its view of the AttentionShard deployment. `cluster.app` deploys it.

It loads no model and no torch: a replica holds the tokenizer and the request models only, so it starts in
a few seconds and is small, and an edge can be scaled on its own without the cost of the engine's imports.
"""

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError

from cluster.config import ServeConfig
from cluster.errors import OverloadedError, ShardLost
from cluster.frontend import Frontend, ShardRequest
from engine.errors import EngineDeadError
from engine.outputs import RequestOutput
from engine.tokenizer import Tokenizer
from mistral.config import ModelConfig
from mistral.presets import resolve_model

RETRY_AFTER_S = 1


@contextlib.contextmanager
def _own_serve_request_id():
    """A handle call made here gets an internal request id of its own. Serve gives a handle call made while
    serving a request that request's internal id, and its router keeps pending calls by that id: sibling calls
    in flight at once (a batch's prompts, self-verification's candidates, a request's resumed samples) would
    collide there, and all but one wait on its backoff instead of being routed."""
    context = serve_context._get_serve_request_context()
    token = serve_context._serve_request_context.set(
        dataclasses.replace(context, _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        serve_context._serve_request_context.reset(token)


class ServeShards:
    """`Shards` over the AttentionShard deployment: Serve picks a replica per request."""

    def __init__(self, handle):
        self.handle = handle.options(stream=True)
        self.health_handle = handle

    async def stream(self, request: ShardRequest) -> AsyncIterator[RequestOutput]:
        with _own_serve_request_id():
            response = self.handle.stream.remote(request.prompt_token_ids, request.params, request.request_id,
                                                  request.resume, request.every_step, request.stream_interval_s)
        try:
            async for delta in response:
                yield delta
        except (RayActorError, ActorUnavailableError, EngineDeadError) as error:
            raise ShardLost(str(error)) from error
        except BackPressureError as error:  # every shard's queue is full: refuse, like our own limits
            raise OverloadedError(f"the attention shards are at capacity; retry in {RETRY_AFTER_S} s",
                                  RETRY_AFTER_S) from error
        finally:
            response.cancel()  # a reader that stopped early aborts the request on its shard

    async def healthy(self) -> bool:
        """Whether a shard's engine works; raises when none can be reached (the frontend bounds the wait)."""
        response = self.health_handle.healthy.remote()
        try:
            return await response
        except asyncio.CancelledError:  # the health check's deadline passed: do not leave the call queued
            response.cancel()
            raise


@serve.ingress()
class Ingress:
    async def __init__(self, config: ServeConfig, shard, router, groups: list, memory_store=None):
        model_dir = resolve_model(config.model)
        model = ModelConfig.from_dir(model_dir)
        self.config, self.router = config, router
        self.frontend = Frontend(config.model_name, Tokenizer.load(model_dir, config.tokenizer),
                                 config.max_model_len or model.max_position_embeddings, model.vocab_size,
                                 ServeShards(shard), config.limits, self._experts if router is not None else None,
                                 self._rebalance if router is not None else None,
                                 expert_health=self._missing_groups if router is not None else None,
                                 memory_info=memory_store.describe.remote if memory_store is not None else None,
                                 stream_interval_s=config.stream_interval_s)
        self.grpc_server = None
        if config.grpc_port is not None:
            from cluster.grpc_api import start_grpc_server

            self.grpc_server, _ = await start_grpc_server(self.frontend, config.host, config.grpc_port,
                                                          api_keys=config.api_keys)

    async def _experts(self) -> dict:
        return await self.router.describe.remote()

    async def _rebalance(self) -> dict:
        return await self.router.rebalance.remote()

    async def _missing_groups(self) -> list[int]:
        return await self.router.missing_groups.remote()

    def __serve_build_asgi_app__(self):
        from cluster.http_api import build_http_app

        return build_http_app(self.frontend, api_keys=self.config.api_keys,
                              max_body_bytes=self.config.limits.max_body_bytes, cors_origins=self.config.cors_origins)
