"""A `Frontend` over one in-process engine (the tiny preset): the servers' tests run without Ray."""

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import openai
import pytest
import uvicorn

from cluster.config import Limits
from cluster.frontend import Frontend, LocalShards
from cluster.grpc_api import start_grpc_server
from cluster.http_api import build_http_app


def make_frontend(llm, limits: Limits = Limits(), expert_info=None, rebalance=None) -> Frontend:
    return Frontend("tiny", llm.tokenizer, llm.max_model_len, llm.llm.engine.model.config.vocab_size,
                    LocalShards(llm), limits, expert_info, rebalance)


@pytest.fixture(scope="session")
def async_llm():
    from engine import AsyncLLM

    llm = AsyncLLM(model="tiny", dtype="float32", progress=False, max_model_len=256)
    yield llm
    llm.shutdown()


@pytest.fixture
def frontend(async_llm) -> Frontend:
    return make_frontend(async_llm)


@pytest.fixture(scope="module")
def base(async_llm) -> Iterator[str]:
    """The HTTP API over the tiny engine, without API keys, for one test module; a module may define its own."""
    with serve_http(make_frontend(async_llm)) as url:
        yield url


@pytest.fixture
def client(base) -> openai.OpenAI:
    """The official openai client of `base`."""
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.005)


@contextlib.contextmanager
def serve_http(frontend: Frontend, **options) -> Iterator[str]:
    """Run the app under uvicorn on 127.0.0.1 (a port the OS picks); yields the base URL."""
    config = uvicorn.Config(build_http_app(frontend, **options), host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive())
        assert server.started, "uvicorn failed to start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def run_in(loop, coroutine):
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)


@pytest.fixture
def serve(loop, async_llm):  # the gRPC server
    """`serve(frontend=None, **server_kwargs) -> "127.0.0.1:PORT"`; every server stops after the test, which
    must leave no request behind in the engine."""
    servers = []

    def start(frontend: Frontend | None = None, **kwargs) -> str:
        server, port = run_in(loop, start_grpc_server(frontend or make_frontend(async_llm), "127.0.0.1", 0, **kwargs))
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        run_in(loop, server.stop(None))
    wait_for(lambda: async_llm.num_unfinished_requests == 0, timeout=10)
