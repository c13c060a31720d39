"""Where an engine step's time goes: decode steps timed, then profiled with torch.profiler (CPU and CUDA).

    .venv/bin/python benchmarks/decode_step_profile.py [--model bench] [--device cuda] [--batches 1,32]
                                                        [--cudnn-attention] [--trace-dir DIR]

For each batch size: that many requests (128-token prompts) are prefilled and decode 10 steps, then `--steps`
decode steps are timed (the device synchronised), then 5 more are profiled. Printed: the mean step, the
profiler's table by CPU time, and per step the calls that wait for the GPU or launch its work. Every step's
key length is new, as in a server whose requests come and go. `--cudnn-attention` lets SDPA take cuDNN's kernel
too (`mistral.attention.GPU_SDPA_BACKENDS` leaves it out).
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import LLM, SamplingParams  # noqa: E402
from mistral import attention  # noqa: E402

DECODE = SamplingParams(max_tokens=100_000, temperature=0, ignore_eos=True)
COUNTED = ("cudaLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaStreamSynchronize", "aten::nonzero",
           "aten::item")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    p.add_argument("--cudnn-attention", action="store_true", help="let SDPA take cuDNN's kernel too")
    p.add_argument("--trace-dir", type=Path, help="also write a Chrome trace per batch size here")
    args = p.parse_args()
    if args.cudnn_attention:
        attention.GPU_SDPA_BACKENDS.insert(0, SDPBackend.CUDNN_ATTENTION)
    llm = LLM(args.model, device=args.device, progress=False)
    engine, device = llm.engine, torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for batch in (int(b) for b in args.batches.split(",")):
        ids = [f"b{batch}-{i}" for i in range(batch)]
        for request_id in ids:
            engine.add_request(request_id, list(range(100, 228)), DECODE)
        for _ in range(10):
            engine.step()
        synchronize(device)
        began = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        synchronize(device)
        print(f"batch {batch}: {(time.perf_counter() - began) / args.steps * 1e3:.2f} ms per decode step "
              f"({args.device}{', cuDNN attention allowed' if args.cudnn_attention else ''})", flush=True)
        with profile(activities=activities) as prof:
            for _ in range(5):
                engine.step()
            synchronize(device)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
        counts = {name: sum(e.name == name for e in prof.events()) / 5 for name in COUNTED}
        print("per step:", ", ".join(f"{name} {n:g}" for name, n in counts.items() if n), flush=True)
        if args.trace_dir:
            prof.export_chrome_trace(str(args.trace_dir / f"decode_b{batch}.json"))
        for request_id in ids:
            engine.abort_request(request_id)
    llm.shutdown()


if __name__ == "__main__":
    main()
