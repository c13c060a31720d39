"""One attention shard's inference engine. `from engine import LLM, SamplingParams`.

The names are resolved lazily so that importing a light submodule (`engine.errors`, `engine.sampling_params`)
does not load the model stack.
"""

import importlib

_EXPORTS = {
    "LLM": "engine.llm",
    "AsyncLLM": "engine.async_llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
