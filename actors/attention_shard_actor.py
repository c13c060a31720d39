"""`AttentionShardActor`: an engine (requests, KV cache, attention) whose MoE layers call remote experts.

The actor joins an existing expert-parallel deployment through its router actor: it builds the same
`RemoteExperts` backend the in-process `LLM(expert_parallel=...)` uses and hands it to `LLM(experts=...)`.
Expert replicas serve any number of shards; with the `torch` transport each shard has its own process-group
session, which the replicas must have been started with.
"""

import ray
import torch

from actors.expert_parallel import NAMESPACE, connect_shard
from engine import LLM, SamplingParams
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

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
        return self.llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=params)

    def health(self) -> bool:
        return True

    def failover_stats(self) -> dict:
        f = self.experts.failover
        return {"failed_sends": f.failed_sends, "resent_batches": f.resent_batches, "stalls": list(f.stall_seconds)}
