"""The gRPC transport of the layer path: an `ExpertService` server per group replica, and `GrpcTransport`.

Server: `serve_expert_group` wraps an `ExpertGroup` in a plain threaded `grpc.server`, so it runs from any
thread or Ray actor without owning an event loop. Every request is decoded and validated before compute; a
malformed one (shape, dtype, byte count, layer, an expert of another group, too many tokens) is answered
INVALID_ARGUMENT with the reason and the server keeps serving. Client mistakes are logged at INFO only. Health
runs an `ExpertProbe` through the group's experts and answers NOT_SERVING when it fails, so a replica whose
compute is wedged does not pass for alive.

Client: `GrpcTransport` keeps one grpc.aio channel per replica on an event loop that runs on its own
background thread, so the synchronous `forward` of the `Transport` seam fans a layer's sends out concurrently
and waits once. A replica that is down, slow or unreachable comes back as a `ReplicaFailure` value within the
deadline (the caller re-sends the batch elsewhere: experts are pure); INVALID_ARGUMENT means the caller built a
wrong batch, which no retry fixes, so it raises `ExpertBatchError` like the in-process group would. Each call is
timed on its own (`forward(..., seconds=...)`), for the layer-path stats.

Message limits are sized from the largest batch a replica accepts (`message_limit_bytes`); the response
[A, H] with A <= N * k is the larger direction.

Legend: N tokens sent, k slots per token, A slots computed by the replica (ids >= 0), H hidden.
"""

import asyncio
import logging
import threading
import time
from concurrent import futures

import grpc
import torch

from experts.expert_group import ExpertBatch, ExpertBatchError, ExpertGroup
from experts.probe import ExpertProbe, ExpertProbeFailed
from protos import expert_service_pb2 as pb
from protos import expert_service_pb2_grpc as pb_grpc
from router_service.transport import ReplicaFailure, ReplicaInfo
from router_service.wire import WireError, dtype_name, from_proto, to_proto

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_GRPC_MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC message lengths are int32


def message_limit_bytes(max_batch_tokens: int, hidden_size: int, num_experts_per_tok: int,
                        dtype: torch.dtype) -> int:
    """Bytes of the largest Forward message either way, with headroom for framing and slightly larger batches.

    Request: N rows of hidden [H] + expert_ids [k] int64 + weights [k] fp32. Response: up to N * k rows of [H].
    The headroom (+10% and 64 KiB) lets a batch a bit over `max_batch_tokens` through the transport so that the
    servicer can answer it with a clear INVALID_ARGUMENT instead of a bare RESOURCE_EXHAUSTED.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    request = max_batch_tokens * (hidden_size * itemsize + num_experts_per_tok * (8 + 4))
    response = max_batch_tokens * num_experts_per_tok * hidden_size * itemsize
    return min(int(max(request, response) * 1.1) + 64 * 1024, _GRPC_MAX_MESSAGE_BYTES)


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class ExpertServicer(pb_grpc.ExpertServiceServicer):
    """ExpertService over one `ExpertGroup` replica; refuses bad input with INVALID_ARGUMENT before compute."""

    def __init__(self, group: ExpertGroup, replica_id: str, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 probe: ExpertProbe | None = None):
        self.group, self.replica_id, self.max_batch_tokens = group, replica_id, max_batch_tokens
        self.probe = probe or ExpertProbe(group)

    def Forward(self, request: pb.ForwardRequest, context: grpc.ServicerContext) -> pb.ForwardResponse:
        try:
            batch = self._decode(request)
            self.group.validate(batch)
        except (WireError, ExpertBatchError) as e:
            logger.info("replica %s refused a batch: %s", self.replica_id, e)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ForwardResponse(output=to_proto(self.group.forward(batch)))  # [A, H]

    def _decode(self, request: pb.ForwardRequest) -> ExpertBatch:
        h, k = self.group.config.hidden_size, self.group.config.num_experts_per_tok
        n = request.hidden.shape[0] if request.hidden.shape else 0
        if n > self.max_batch_tokens:
            raise WireError(f"batch has {n} tokens; replica {self.replica_id} takes at most "
                            f"{self.max_batch_tokens} per call: split the batch or raise max_batch_tokens")
        fields = {}
        for name, limit in (("hidden", h), ("expert_ids", k), ("weights", k)):
            if not request.HasField(name):
                raise WireError(f"ForwardRequest.{name} is missing")
            try:
                fields[name] = from_proto(getattr(request, name), max_elements=self.max_batch_tokens * limit)
            except WireError as e:
                raise WireError(f"{name}: {e}") from None
        return ExpertBatch(request.layer_id, **fields)  # hidden [N, H], ids [N, k], weights [N, k]

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        """SERVING when the experts computed a probe within the caller's deadline (at most the probe's own)."""
        remaining = context.time_remaining()
        try:
            self.probe.check(None if remaining is None else min(self.probe.timeout_s, remaining))
        except ExpertProbeFailed as e:
            logger.warning("replica %s is not serving: %s", self.replica_id, e)
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING)
        return pb.HealthResponse(status=pb.HealthResponse.SERVING)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.InfoResponse:
        config = self.group.config
        return pb.InfoResponse(group_id=self.group.group_id, replica_id=self.replica_id,
                               expert_ids=list(self.group.experts), num_layers=config.num_layers,
                               hidden_size=config.hidden_size, dtype=dtype_name(self.group.dtype),
                               max_batch_tokens=self.max_batch_tokens,
                               num_experts_per_tok=config.num_experts_per_tok)


def serve_expert_group(group: ExpertGroup, replica_id: str, host: str = "127.0.0.1", port: int = 0,
                       max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, max_workers: int = 4,
                       probe: ExpertProbe | None = None) -> tuple[grpc.Server, int]:
    """Start an ExpertService for `group` on host:port (0 picks a free port) -> (started server, bound port).

    Stop it with `server.stop(grace).wait()`. SO_REUSEPORT is off so that two replicas never share a port.
    `probe`: the replica's health probe, when its other health checks share it (default: one of its own).
    """
    config = group.config  # batches may travel in fp32 to a group with 16-bit weights (it converts on arrival)
    limit = message_limit_bytes(max_batch_tokens, config.hidden_size, config.num_experts_per_tok, torch.float32)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="msem-expert"),
                         options=_size_options(limit) + [("grpc.so_reuseport", 0)])
    pb_grpc.add_ExpertServiceServicer_to_server(ExpertServicer(group, replica_id, max_batch_tokens, probe), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind the expert service of replica {replica_id} to {host}:{port}")
    server.start()
    return server, bound


def is_serving(endpoint: str, timeout_s: float = 2.0) -> bool:
    """True when the ExpertService at host:port answers its health check within the deadline."""
    try:
        with grpc.insecure_channel(endpoint) as channel:
            reply = pb_grpc.ExpertServiceStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        return reply.status == pb.HealthResponse.SERVING
    except grpc.RpcError:
        return False


def refuses(endpoint: str, timeout_s: float = 0.5) -> bool:
    """True when nothing listens at host:port any more (the connection is refused: the process is gone). A
    server that is slow to answer, or a host that cannot be reached, is not proof of death: False."""
    try:
        with grpc.insecure_channel(endpoint) as channel:
            pb_grpc.ExpertServiceStub(channel).Health(pb.HealthRequest(), timeout=timeout_s)
        return False
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE


class GrpcTransport:
    """`Transport` over ExpertService: concurrent grpc.aio calls from a background event loop, with deadlines.

    timeout_s: deadline of each call. max_message_bytes: the send/receive limit of the channels; give it
    `message_limit_bytes(...)` of the replicas it talks to so that both sides agree.
    """

    name = "grpc"
    times_sends = True  # forward(..., seconds=...) times each call

    def __init__(self, timeout_s: float = 5.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.timeout_s = timeout_s
        # Reconnect quickly: a restarted replica on the same address is usable again within a second.
        self._options = _size_options(max_message_bytes) + [("grpc.initial_reconnect_backoff_ms", 100),
                                                            ("grpc.max_reconnect_backoff_ms", 1000)]
        self._channels: dict[str, tuple[str, grpc.aio.Channel, pb_grpc.ExpertServiceStub]] = {}  # loop-owned
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="msem-grpc-transport", daemon=True)
        self._thread.start()
        self._closed = False

    def forward(self, sends: list[tuple[ReplicaInfo, ExpertBatch]],
                seconds: list[float] | None = None) -> list[torch.Tensor | ReplicaFailure]:
        """One result per send, in order: [A, H] on the batch's device, or a `ReplicaFailure`. `seconds`, when
        given, receives each call's time from sending to its answer (or failure), in send order."""
        if self._closed:
            raise RuntimeError("GrpcTransport is closed")
        if not sends:
            return []
        requests = [pb.ForwardRequest(layer_id=b.layer_id, hidden=to_proto(b.hidden),  # encode off the loop
                                      expert_ids=to_proto(b.expert_ids), weights=to_proto(b.weights))
                    for _, b in sends]
        began = time.perf_counter()
        calls = asyncio.run_coroutine_threadsafe(self._call_all([r for r, _ in sends], requests), self._loop)
        try:
            timed = calls.result(timeout=self.timeout_s + 5.0)  # each call has its own deadline
        except futures.TimeoutError:
            calls.cancel()
            timed = [(ReplicaFailure(r.replica_id, "the transport's event loop did not answer"),
                      time.perf_counter() - began) for r, _ in sends]
        if seconds is not None:
            seconds.extend(s for _, s in timed)
        return [self._decode(r, b, resp) for (r, b), (resp, _) in zip(sends, timed)]

    async def _call_all(self, replicas: list[ReplicaInfo], requests: list[pb.ForwardRequest]) -> list:
        """-> (answer, seconds) per call."""
        stubs = [await self._stub(r) for r in replicas]
        return await asyncio.gather(*(self._timed_call(r, s, q) for r, s, q in zip(replicas, stubs, requests)))

    async def _timed_call(self, replica: ReplicaInfo, stub: pb_grpc.ExpertServiceStub | None,
                          request: pb.ForwardRequest) -> tuple:
        began = time.perf_counter()
        answer = await self._call(replica, stub, request)
        return answer, time.perf_counter() - began

    async def _call(self, replica: ReplicaInfo, stub: pb_grpc.ExpertServiceStub | None,
                    request: pb.ForwardRequest) -> pb.ForwardResponse | ReplicaFailure | ExpertBatchError:
        """Never raises: a refused batch comes back as the error to raise, anything else as a failure."""
        if stub is None:
            return ReplicaFailure(replica.replica_id, "the replica publishes no grpc endpoint")
        try:
            return await stub.Forward(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return ExpertBatchError(f"replica {replica.replica_id} at {replica.endpoints['grpc']} "
                                        f"refused the batch: {e.details()}")
            # UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED and the rest: this replica gave no answer.
            return ReplicaFailure(replica.replica_id, f"{e.code().name}: {e.details()}")
        except (OSError, ValueError) as e:  # unreachable or unparsable address
            return ReplicaFailure(replica.replica_id, f"{type(e).__name__}: {e}")

    async def _stub(self, replica: ReplicaInfo) -> pb_grpc.ExpertServiceStub | None:
        """The cached stub of a replica; a new channel when its published address changed."""
        address = replica.endpoints.get("grpc")
        cached = self._channels.get(replica.replica_id)
        if cached is not None and cached[0] == address:
            return cached[2]
        if cached is not None:
            del self._channels[replica.replica_id]
            await cached[1].close()
        if not address:
            return None
        channel = grpc.aio.insecure_channel(address, options=self._options)
        self._channels[replica.replica_id] = (address, channel, pb_grpc.ExpertServiceStub(channel))
        return self._channels[replica.replica_id][2]

    @staticmethod
    def _decode(replica: ReplicaInfo, batch: ExpertBatch, response) -> torch.Tensor | ReplicaFailure:
        """A checked [A, H] answer; a replica that answers garbage counts as one that did not answer."""
        if isinstance(response, ExpertBatchError):
            raise response
        if isinstance(response, ReplicaFailure):
            return response
        try:
            out = from_proto(response.output)  # [A, H]
        except WireError as e:
            return ReplicaFailure(replica.replica_id, f"malformed response: {e}")
        expected = [int((batch.expert_ids >= 0).sum()), batch.hidden.shape[1]]
        if list(out.shape) != expected or out.dtype != batch.hidden.dtype:
            return ReplicaFailure(replica.replica_id, f"response is {out.dtype} {list(out.shape)}, "
                                                      f"expected {batch.hidden.dtype} {expected}")
        return out.to(batch.hidden.device)

    def close(self) -> None:
        """Close every channel and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True

        async def close_channels():
            for _, channel, _ in self._channels.values():
                await channel.close()
            self._channels.clear()

        asyncio.run_coroutine_threadsafe(close_channels(), self._loop).result(timeout=self.timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout_s)
        self._loop.close()

    def __enter__(self) -> "GrpcTransport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
