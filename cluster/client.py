"""`InferenceClient`: a small synchronous Python client of the gRPC API, and the `msem client` command.

    with InferenceClient("127.0.0.1:50051") as client:
        print(client.generate("Hello", max_tokens=16, temperature=0).choices[0].text)
        for message in client.chat_stream("Write a haiku", max_tokens=64):
            print(message.choices[0].text if message.choices else "", end="")

Methods return the protobuf messages of protos/inference.proto. A request is checked here as the server checks
it (`cluster/grpc_messages.py`), so a mistake raises `InvalidRequest` before anything is sent. A failed call
raises an `InferenceError`
subclass named after its status code, with the server's message, so callers can catch what they can handle
(`Overloaded`: retry later) without knowing gRPC. Leaving a stream early cancels the call, which stops the
generation on the server.

    msem client generate --prompt "Hello" [--stream] [--max-tokens N --temperature T --top-p P --seed S]
    msem client chat --prompt "Write a haiku" [--system TEXT] [--stream]
    msem client models | msem client tokenize "Hello world" | msem client health
    (each takes --target HOST:PORT (default 127.0.0.1:50051), --api-key KEY (default $MSEM_API_KEY), --timeout S)
"""

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.grpc_messages import build_message
from engine.errors import InvalidRequestError
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
USAGE_ERROR = 2


class InferenceError(Exception):
    """A call failed; `code` is its gRPC status code, the message is the server's (or the channel's)."""

    def __init__(self, message: str, code: grpc.StatusCode):
        super().__init__(message)
        self.code = code


class InvalidRequest(InferenceError):
    """The server refused the request's values (INVALID_ARGUMENT); the message says what to change."""


class ModelNotFound(InferenceError):
    """The request names a model the server does not serve (NOT_FOUND)."""


class Overloaded(InferenceError):
    """The server is at its admission limits (RESOURCE_EXHAUSTED); retry later."""


class Unauthenticated(InferenceError):
    """The API key is missing or wrong (UNAUTHENTICATED)."""


class Unavailable(InferenceError):
    """The server cannot be reached, or no shard can run the request now (UNAVAILABLE)."""


class DeadlineExceeded(InferenceError):
    """The call's timeout passed before it finished (DEADLINE_EXCEEDED); the server stopped generating."""


_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.NOT_FOUND: ModelNotFound,
           grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded, grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
           grpc.StatusCode.UNAVAILABLE: Unavailable, grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded}

Messages = str | Sequence[dict[str, str]]


class InferenceClient:
    """Calls one server's Inference service. `timeout` (seconds, None = none) bounds each call, a stream whole.

    Sampling settings are keyword arguments named as the fields of `SamplingParams` in the proto
    (`max_tokens=16, temperature=0, stop="\\n", seed=1, logprobs=2, structured_outputs={"json": schema}, ...`);
    unset ones take the server's defaults.
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, timeout: float | None = None):
        self.target, self.timeout = target, timeout
        # The server bounds what it generates; a large answer (many samples with logprobs) must still arrive.
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(self, prompt: str | Sequence[int], *, model: str | None = None,
                 **sampling: Any) -> pb.GenerateResponse:
        """Complete a prompt (text, or token ids taken as given)."""
        return self._call(self._stub.Generate, _request(prompt, model, False, sampling))

    def generate_stream(self, prompt: str | Sequence[int], *, model: str | None = None,
                        **sampling: Any) -> Iterator[pb.GenerateStreamResponse]:
        """Complete a prompt, yielding each message of new text and tokens; the last one carries `usage`."""
        return self._stream(self._stub.GenerateStream, _request(prompt, model, False, sampling))

    def chat(self, messages: Messages, *, model: str | None = None, **sampling: Any) -> pb.GenerateResponse:
        """Answer a conversation: {"role", "content"} messages, or one string as a single user message."""
        return self._call(self._stub.Chat, _request(_messages(messages), model, True, sampling))

    def chat_stream(self, messages: Messages, *, model: str | None = None,
                    **sampling: Any) -> Iterator[pb.GenerateStreamResponse]:
        return self._stream(self._stub.ChatStream, _request(_messages(messages), model, True, sampling))

    def list_models(self) -> list[pb.Model]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def tokenize(self, text: str, *, model: str | None = None) -> pb.TokenizeResponse:
        return self._call(self._stub.Tokenize, pb.TokenizeRequest(text=text, model=model))

    def detokenize(self, token_ids: Sequence[int], *, model: str | None = None) -> str:
        return self._call(self._stub.Detokenize, pb.DetokenizeRequest(token_ids=token_ids, model=model)).text

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status of the server ("") or of one service: "SERVING", "NOT_SERVING", ..."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request):
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def _stream(self, method: grpc.UnaryStreamMultiCallable, request) -> Iterator:
        call = method(request, timeout=self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()  # a no-op once the stream ended; stops the generation when the caller leaves early

    def _error(self, error: grpc.RpcError) -> InferenceError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"the server at {self.target} is unavailable: {details}"
        return _ERRORS.get(code, InferenceError)(details or code.name, code)


def _messages(messages: Messages) -> Sequence[dict[str, str]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _request(prompt, model: str | None, chat: bool, sampling: dict) -> pb.GenerateRequest | pb.ChatRequest:
    """The request message, checked here as the server checks it: a mistake raises `InvalidRequest` at once."""
    try:
        return build_message(prompt, model, chat, sampling)
    except InvalidRequestError as error:
        raise InvalidRequest(str(error), grpc.StatusCode.INVALID_ARGUMENT) from None
    except ValueError as error:  # protobuf: a keyword that is no field of SamplingParams
        raise InvalidRequest(f"{error}; see the fields of SamplingParams in protos/inference.proto",
                             grpc.StatusCode.INVALID_ARGUMENT) from None


# ---- msem client ... ----

def add_client_command(commands) -> None:
    client = commands.add_parser("client", help="call a running server's gRPC API")
    actions = client.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                        help=f"the server's gRPC address (default: {DEFAULT_TARGET})")
    common.add_argument("--api-key", default=os.environ.get("MSEM_API_KEY"), metavar="KEY",
                        help="API key, when the server has keys (default: $MSEM_API_KEY)")
    common.add_argument("--timeout", type=float, metavar="SECONDS", help="how long a call may take (default: no limit)")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    sampling.add_argument("--model", help="the model to run (default: the server's)")
    sampling.add_argument("--stream", action="store_true", help="print the text as it is generated")
    sampling.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling mass (default: 1)")
    sampling.add_argument("--seed", type=int, help="seed for reproducible sampling")
    sampling.add_argument("--stop", action="append", help="stop before this string (repeatable)")

    actions.add_parser("generate", parents=[common, sampling], help="complete a prompt").set_defaults(
        run=_client_command(_run_generate))
    chat = actions.add_parser("chat", parents=[common, sampling], help="answer a prompt as a user message")
    chat.add_argument("--system", help="a system message before the prompt")
    chat.set_defaults(run=_client_command(_run_generate))
    actions.add_parser("models", parents=[common], help="list the served models").set_defaults(
        run=_client_command(_run_models))
    tokenize = actions.add_parser("tokenize", parents=[common], help="print the token ids and pieces of a text")
    tokenize.add_argument("text", metavar="TEXT")
    tokenize.set_defaults(run=_client_command(_run_tokenize))
    detokenize = actions.add_parser("detokenize", parents=[common], help="print the text of token ids")
    detokenize.add_argument("token_ids", metavar="ID", type=int, nargs="+")
    detokenize.set_defaults(run=_client_command(_run_detokenize))
    actions.add_parser("health", parents=[common], help="print the server's health; exit 1 unless SERVING"
                       ).set_defaults(run=_client_command(_run_health))


def _client_command(run: Callable[[InferenceClient, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command with a client; a failed call prints `error: <message>` and exits 2, without a traceback."""
    @functools.wraps(run)
    def command(args: argparse.Namespace) -> int:
        try:
            with InferenceClient(args.target, args.api_key, args.timeout) as client:
                return run(client, args)
        except InferenceError as error:
            print(f"error: {error}", file=sys.stderr)
            return USAGE_ERROR
    return command


def _run_generate(client: InferenceClient, args: argparse.Namespace) -> int:
    sampling = {name: value for name in ("max_tokens", "temperature", "top_p", "seed", "stop")
                if (value := getattr(args, name)) is not None}
    if args.action == "chat":
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = system + [{"role": "user", "content": args.prompt}]
        call = client.chat_stream if args.stream else client.chat
    else:
        prompt, call = args.prompt, client.generate_stream if args.stream else client.generate
    replies = call(prompt, model=args.model, **sampling)
    finish, usage = None, pb.Usage()
    for reply in replies if args.stream else [replies]:  # stream messages and the whole answer read alike
        for choice in reply.choices:
            sys.stdout.write(choice.text)
            sys.stdout.flush()
            finish = choice.finish_reason or finish
        if reply.HasField("usage"):
            usage = reply.usage
    sys.stdout.write("\n")
    print(f"[finish_reason: {finish}; tokens: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion]",
          file=sys.stderr)
    return 0


def _run_models(client: InferenceClient, args: argparse.Namespace) -> int:
    for model in client.list_models():
        print(f"{model.id}\tmax_model_len={model.max_model_len}\tvocab_size={model.vocab_size}")
    return 0


def _run_tokenize(client: InferenceClient, args: argparse.Namespace) -> int:
    response = client.tokenize(args.text)
    for token_id, piece in zip(response.token_ids, response.pieces, strict=True):
        print(f"{token_id}\t{piece!r}")
    return 0


def _run_detokenize(client: InferenceClient, args: argparse.Namespace) -> int:
    print(client.detokenize(args.token_ids))
    return 0


def _run_health(client: InferenceClient, args: argparse.Namespace) -> int:
    status = client.health()
    print(status)
    return 0 if status == "SERVING" else 1
