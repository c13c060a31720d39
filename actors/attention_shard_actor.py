"""`AttentionShardActor`: an engine (requests, KV cache, attention) whose MoE layers call remote experts.

The actor joins an existing expert-parallel deployment through its router actor: it builds the same
`RemoteExperts` backend the in-process `LLM(expert_parallel=...)` uses and hands it to `LLM(experts=...)`.
Expert replicas serve any number of shards; with the `torch` transport each shard has its own process-group
session, which the replicas must have been started with.

An engine that failed inside a step (anything but a bad request, which fails alone) is dead: its state is no
longer trusted, `health` raises so that the actor's supervisor replaces it, and later requests fail at once
with `EngineDeadError`, as `AsyncLLM` does.
"""

import ray
import torch

from actors.expert_parallel import NAMESPACE, connect_shard
from engine import LLM, SamplingParams
from engine.errors import EngineDeadError, InvalidRequestError
from engine.outputs import RequestOutput
from experts.parallel_config import ExpertParallelConfig
from mistral.checkpoint import DTYPES


class AttentionShardActor:
    def __init__(self, model_dir: str, router_name: str, config: ExpertParallelConfig, session: str,
                 dtype: str = "auto", **llm_kwargs):
        device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"  # after Ray pinned a GPU
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if device == "cuda" else torch.float32
        else:
            torch_dtype = DTYPES[dtype]
        router = ray.get_actor(router_name, namespace=NAMESPACE)
        budget = llm_kwargs.get("max_num_batched_tokens", 2048)
        self.experts = connect_shard(router, config, session, model_dir, torch_dtype, budget)
        self.llm = LLM(model_dir, dtype=str(torch_dtype).removeprefix("torch."), device=device,
                       experts=self.experts, progress=False, **llm_kwargs)
        self.dead: BaseException | None = None

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        self._raise_if_dead()
        try:
            return self.llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=params)
        except InvalidRequestError:
            raise
        except Exception as error:
            self.dead = error
            raise

    def health(self) -> bool:
        """True while the engine works; raises `EngineDeadError` once it failed."""
        self._raise_if_dead()
        return True

    def _raise_if_dead(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead!r}") from self.dead

    def failover_stats(self) -> dict:
        f = self.experts.failover
        return {"failed_sends": f.failed_sends, "resent_batches": f.resent_batches, "stalls": list(f.stall_seconds)}
