"""Where and in what precision each component computes: decided once, in the composition, and passed down.

`compute_for(dtype, gpus)` is the one decision. A component asked for GPUs computes on CUDA, in bf16 when the
config says "auto"; one without computes on the CPU in fp32 (CPU bf16 matmuls are orders of magnitude slower).
Components receive the result; none of them looks at `torch.cuda` to guess.

An attention shard's compute dtype is also the wire dtype of its layer path: expert groups convert a batch on
arrival when their weights differ (a CPU shard in fp32 in front of GPU groups in bf16), and answer in it.
"""

from dataclasses import dataclass

import torch

from engine.llm import resolve_device_dtype


@dataclass(frozen=True)
class Compute:
    device: str  # "cuda" or "cpu"; on CUDA, the first GPU Ray gave the process (CUDA_VISIBLE_DEVICES)
    dtype: str  # "float32", "bfloat16", "float16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def devices(self, count: int = 1) -> list[torch.device]:
        """The process's `count` devices: its GPUs in Ray's order, or the CPU."""
        if self.device == "cpu":
            return [torch.device("cpu")]
        available = torch.cuda.device_count()
        if available < count:
            raise RuntimeError(f"this process was given {count} GPUs but CUDA sees {available} "
                               "(check CUDA_VISIBLE_DEVICES and the driver)")
        return [torch.device("cuda", i) for i in range(count)]


def compute_for(dtype: str, gpus: float) -> Compute:
    """The compute of a component given `gpus` GPUs (0: CPU) under the config's `dtype` ("auto" or a name)."""
    device, torch_dtype = resolve_device_dtype("cuda" if gpus > 0 else "cpu", dtype)
    return Compute(device.type, str(torch_dtype).removeprefix("torch."))

