"""`LLM`: the offline facade, shaped like vLLM's so users feel at home.

    from engine import LLM, SamplingParams
    llm = LLM(model="tiny")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
    print(out[0].outputs[0].text)

A prompt is text, a list of token ids, or one of vLLM's prompt dicts: `{"prompt": "Hello"}` or
`{"prompt_token_ids": [1, 22557]}` (with an optional "prompt" beside the ids, reported back as the text).
"""

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch

from engine.config import EngineConfig
from engine.errors import EngineConfigError, InvalidRequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, merge
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from experts.parallel_config import ExpertParallelConfig
from mistral.checkpoint import DTYPES, CheckpointReader
from mistral.moe import ExpertBackend
from mistral.presets import resolve_model
from mistral.weights import load_model

Prompt = str | Sequence[int] | dict
PROMPT_KEYS = ("prompt", "prompt_token_ids")  # the vLLM prompt-dict keys msem takes


def _token_ids(ids) -> list[int]:
    if isinstance(ids, (str, bytes, bytearray, dict)) or not isinstance(ids, Sequence):
        raise TypeError(f"a prompt is text, a list of token ids or a prompt dict; got {type(ids).__name__}")
    bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
    if bad is not None:
        raise TypeError(f"token ids are ints; got {type(bad).__name__} {bad!r}")
    return list(ids)


def resolve_device_dtype(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """"auto" is bf16 on CUDA and fp32 on CPU (CPU bf16 matmuls are orders of magnitude slower)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return dev, DTYPES[dtype]


class LLM:
    def __init__(self, model: str = "tiny", *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str | None = None, max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, kv_cache_memory: int | None = None,
                 enable_prefix_caching: bool = True, host_kv_cache_memory: int = 0,
                 kv_write_policy: str = "write-back", memory_store_call: Callable | None = None,
                 experts: ExpertBackend | None = None, expert_parallel: ExpertParallelConfig | int | None = None,
                 progress: bool = True):
        self.model_path = resolve_model(model)
        dev, torch_dtype = resolve_device_dtype(device, dtype)
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise EngineConfigError(f"device {str(dev)!r}: this torch ({torch.__version__}) sees "
                                    f"{torch.cuda.device_count()} CUDA device(s); use device='cpu' or another GPU")
        self.expert_runtime = None
        if expert_parallel is not None:
            if experts is not None:
                raise ValueError("pass either experts or expert_parallel, not both")
            if isinstance(expert_parallel, int):
                expert_parallel = ExpertParallelConfig(num_groups=expert_parallel)
            # The one upward reference: the composition of Ray actors lives in actors/, imported on demand so
            # the single-process engine never loads Ray.
            from actors.expert_parallel import start_expert_parallel

            self.expert_runtime = start_expert_parallel(str(self.model_path), expert_parallel, dtype, torch_dtype,
                                                        max_num_batched_tokens)
            experts = self.expert_runtime.backend
        checkpoint = CheckpointReader(self.model_path)
        net = load_model(checkpoint, torch_dtype, dev, experts=experts, progress=progress)
        self.tokenizer = Tokenizer.load(self.model_path, tokenizer)
        config = EngineConfig(max_model_len=max_model_len, block_size=block_size, max_num_seqs=max_num_seqs,
                              max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching,
                              host_kv_cache_memory=host_kv_cache_memory, kv_write_policy=kv_write_policy)
        self.engine = LLMEngine(net, self.tokenizer, config, checkpoint.identity, memory_store_call)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the KV tiers' threads and the expert-parallel runtime (router and expert group actors), if any."""
        self.engine.close()
        if self.expert_runtime is not None:
            self.expert_runtime.shutdown()
            self.expert_runtime = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Complete each prompt (text, or token ids via `prompt_token_ids`); outputs in input order."""
        is_list = isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes, bytearray))
        if prompt_token_ids is not None:
            items = [(None, _token_ids(ids)) for ids in prompt_token_ids]
        elif prompts is None or is_list and not prompts:
            raise InvalidRequestError("no prompts given: pass prompts or prompt_token_ids", param="prompt")
        elif is_list and not isinstance(prompts[0], int):
            items = [self._encode(p) for p in prompts]
        else:  # one prompt; `_encode` raises a TypeError for what is not one
            items = [self._encode(prompts)]
        return self._run(items, sampling_params)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        items = [(None, self.tokenizer.encode_chat(conv)) for conv in conversations]
        return self._run(items, sampling_params)

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[RequestOutput]:
        """Yield one request's deltas as they are generated (text pieces concatenate to the output)."""
        text, ids = (None, self.tokenizer.encode_chat(prompt)) if chat else self._encode(prompt)
        request_id = str(next(self._ids))
        self.engine.add_request(request_id, ids, sampling_params or SamplingParams(), text)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    yield out
        finally:
            self.engine.abort_request(request_id)

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """-> (text, token ids) of one prompt; a `TypeError` names what is not a prompt."""
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            unknown = sorted(str(k) for k in prompt if k not in PROMPT_KEYS)
            if unknown or not prompt:
                raise TypeError(f"a prompt dict takes {' and/or '.join(PROMPT_KEYS)}; got keys {unknown or '[]'}")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"a prompt dict's 'prompt' is text; got {type(text).__name__}")
            if "prompt_token_ids" in prompt:
                return text, _token_ids(prompt["prompt_token_ids"])
            return text, self.tokenizer.encode(text)
        return None, _token_ids(prompt)

    def _run(self, items: list[tuple[str | None, list[int]]],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        params = params or SamplingParams()
        per_item = list(params) if isinstance(params, Sequence) else [params] * len(items)
        if len(per_item) != len(items):
            raise InvalidRequestError(f"got {len(per_item)} sampling params for {len(items)} prompts")
        for p, (_, ids) in zip(per_item, items):
            self.engine.validate(ids, p)  # all or nothing: refuse before any request starts
        ids = [str(next(self._ids)) for _ in items]
        for request_id, (text, tokens), p in zip(ids, items, per_item):
            self.engine.add_request(request_id, tokens, p, text)
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                results[delta.request_id] = merge(results.get(delta.request_id), delta)
        return [results[i] for i in ids]
