"""msem vs transformers on one checkpoint, side by side, in one run (fp32 on the CPU by default).

    .venv/bin/python benchmarks/engine_vs_hf.py --cases a,b,c --json /tmp/bench.json
    python benchmarks/engine_vs_hf.py --device cuda           # both on the GPU, bf16 (--dtype float32 to change)

Cases (prompts are seeded random token ids; greedy; EOS ignored on both sides):

* (a) one request, 128-token prompt, 128 new tokens: output tokens/s, and msem's share of the memory-bandwidth
  roofline (weight bytes one decoded token reads / measured bandwidth).
* (b) 32 concurrent requests of the same shape: total generated tokens/s. msem gets all 32 in one `generate`
  call (continuous batching); transformers one left-padded batched `generate`.
* (c) time to first token of one 2,048-token prompt (msem `max_tokens=1`; transformers `max_new_tokens=1`), with
  msem's default 2,048-token step budget (one step) and, for comparison, a chunked budget (`--ttft-chunk`).

Why every repeat uses fresh prompts: msem caches prompt prefixes, so timing the same prompt twice would time a
cache hit. Each side is warmed up once with a short run first; each figure is the best of `--repeats` runs
(the median is reported too). Timings on a shared machine are noisy: compare ratios from the same run.

Case (b) is compute-bound, not bandwidth-bound: its roofline is the FLOPs of all 32 x 256 token passes over
the measured speed of one large matrix product in the run's dtype.

The (a) roofline counts weights only (the KV cache read per token is small at these lengths): per layer the
attention projections, two norms, the gate and the top-k experts' w1/w2/w3; plus one embedding row, the final
norm and the LM head.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.nn.attention import SDPBackend

from engine import LLM, SamplingParams
from mistral import attention
from mistral.config import ModelConfig
from mistral.presets import resolve_model

DEFAULT_REPEATS = {"a": 3, "b": 1, "c": 3}
TARGETS = {"a": 1.2, "b": 4.0}  # msem / transformers throughput ratio to reach


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Token ids drawn from [3, vocab) so no prompt holds the special ids 0-2 (unk, bos, eos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (num, length), generator=gen).tolist()


def best_and_median(samples: list[float], lower_is_better: bool) -> dict:
    best = min(samples) if lower_is_better else max(samples)
    return {"best": best, "median": statistics.median(samples), "samples": samples}


# ---- memory bandwidth roofline ----

def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs it asynchronously; the CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes on `device`, its queued work included."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def measure_bandwidth(device: torch.device, dtype: torch.dtype, gib: float = 1.0, repeats: int = 5) -> dict:
    """GB/s of a streaming read (`torch.sum`) and of a copy (read + write) over `gib` GiB, best of n."""
    x = torch.ones(int(gib * 2**30) // dtype.itemsize, dtype=dtype, device=device)
    y = torch.empty_like(x)
    nbytes = x.numel() * dtype.itemsize
    read = [nbytes / timed(x.sum, device) / 1e9 for _ in range(repeats)]
    copy = [2 * nbytes / timed(lambda: y.copy_(x), device) / 1e9 for _ in range(repeats)]
    return {"read_gb_s": max(read), "copy_gb_s": max(copy), "tensor_gib": gib}


def measure_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of one large matrix product of the bench shapes (2048 x 512 @ 512 x 1792), best of n."""
    a = torch.randn(2048, 512, dtype=dtype, device=device)
    b = torch.randn(1792, 512, dtype=dtype, device=device)
    a @ b.T
    best = min(timed(lambda: a @ b.T, device) for _ in range(repeats))
    return 2 * a.shape[0] * a.shape[1] * b.shape[0] / best / 1e9


def active_params(cfg: ModelConfig, with_head: bool = True) -> int:
    """Weights one token's forward pass touches: per layer the attention projections, two norms, the gate and
    the top-k experts; plus one embedding row, the final norm and (if it is projected) the LM head."""
    h = cfg.hidden_size
    attention = h * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # wq, wk, wv, wo
    if cfg.is_moe:
        ffn = h * cfg.num_experts + cfg.num_experts_per_tok * cfg.num_expert_params  # gate + top-k experts
    else:
        ffn = cfg.num_expert_params
    per_layer = attention + 2 * h + ffn  # + attention_norm, ffn_norm
    return h + cfg.num_layers * per_layer + h + (cfg.vocab_size * h if with_head else 0)


def weight_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Bytes of weights one decoded token reads (see the module docstring)."""
    return dtype_bytes * active_params(cfg)


def compute_bound_tokens_per_s(cfg: ModelConfig, gflops: float, num: int, prompt: int, new: int) -> float:
    """Generated tokens/s if every matrix product of case (b) ran at `gflops`: 2 FLOPs per weight per token,
    prompt tokens without the LM head (only the last row of a prompt is projected), attention scores ignored."""
    flops = 2 * num * (prompt * active_params(cfg, with_head=False) + new * active_params(cfg))
    return num * new / (flops / (gflops * 1e9))


# ---- the two sides ----

class FirstTokenClock:
    """transformers streamer that records when the first generated token arrives (batch of one)."""

    def __init__(self):
        self.calls, self.first_at = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.first_at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, streamer=None) -> list[list[int]]:
    """One batched greedy `generate`, left-padded; returns the new tokens of each prompt."""
    longest = max(len(p) for p in prompts)
    pad_id = model.config.eos_token_id
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(p)
        attention_mask[i, longest - len(p):] = 1
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=pad_id,
                             streamer=streamer)
    return out[:, longest:].tolist()


def msem_generate(llm: LLM, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    return [o.outputs[0].token_ids for o in outs]


def msem_stream(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """One request through `LLM.stream`: (tokens, seconds to the first token)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    t0, first_at, tokens = time.perf_counter(), None, []
    for delta in llm.stream(prompt, params):
        first_at = first_at or time.perf_counter()
        tokens += delta.outputs[0].token_ids
    return tokens, first_at - t0


# ---- cases ----

def case_a(llm, hf, cfg: ModelConfig, repeats: int, bandwidth: dict, dtype_bytes: int) -> dict:
    new, figures = 128, {"msem": [], "hf": [], "msem_decode": [], "hf_decode": []}
    identical, first_mismatch = True, None
    for r in range(repeats):
        prompt = random_prompts(1, 128, cfg.vocab_size, seed=100 + r)[0]
        t0 = time.perf_counter()
        ours, ttft = msem_stream(llm, prompt, new)
        elapsed = time.perf_counter() - t0
        figures["msem"].append(new / elapsed)
        figures["msem_decode"].append((new - 1) / (elapsed - ttft))
        clock = FirstTokenClock()
        t0 = time.perf_counter()
        theirs = hf_generate(hf, [prompt], new, streamer=clock)[0]
        elapsed = time.perf_counter() - t0
        figures["hf"].append(new / elapsed)
        figures["hf_decode"].append((new - 1) / (t0 + elapsed - clock.first_at))
        if ours != theirs and first_mismatch is None:
            identical = False
            first_mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                                  min(len(ours), len(theirs)))
        log(f"  (a) repeat {r + 1}/{repeats}: msem {figures['msem'][-1]:.1f} tok/s, "
            f"transformers {figures['hf'][-1]:.1f} tok/s")
    print(f"greedy tokens identical: {identical}" + ("" if identical else f" (first mismatch at {first_mismatch})"),
          flush=True)
    out = {k: best_and_median(v, lower_is_better=False) for k, v in figures.items()}
    per_token = weight_bytes_per_token(cfg, dtype_bytes)
    roofline = bandwidth["read_gb_s"] * 1e9 / per_token
    out["greedy_identical"] = identical
    out["roofline"] = {"weight_bytes_per_token": per_token, "tokens_per_s": roofline,
                       "msem_fraction": out["msem"]["best"] / roofline,
                       "msem_decode_fraction": out["msem_decode"]["best"] / roofline}
    out["ratio"] = out["msem"]["best"] / out["hf"]["best"]
    return out


def case_b(llm, hf, cfg: ModelConfig, repeats: int, gflops: float) -> dict:
    num, new, figures, matches = 32, 128, {"msem": [], "hf": []}, 0
    for r in range(repeats):
        prompts = random_prompts(num, 128, cfg.vocab_size, seed=200 + r)
        t0 = time.perf_counter()
        ours = msem_generate(llm, prompts, new)
        figures["msem"].append(num * new / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        theirs = hf_generate(hf, prompts, new)
        figures["hf"].append(num * new / (time.perf_counter() - t0))
        matches = sum(a == b for a, b in zip(ours, theirs))
        log(f"  (b) repeat {r + 1}/{repeats}: msem {figures['msem'][-1]:.1f} tok/s, "
            f"transformers {figures['hf'][-1]:.1f} tok/s")
    print(f"(b) greedy sequences identical: {matches}/{num} (batched arithmetic may break near-ties)", flush=True)
    out = {k: best_and_median(v, lower_is_better=False) for k, v in figures.items()}
    out["ratio"] = out["msem"]["best"] / out["hf"]["best"]
    out["identical_sequences"] = matches
    out["compute_bound"] = {"gflops": gflops,
                            "tokens_per_s": compute_bound_tokens_per_s(cfg, gflops, num, 128, new)}
    return out


def case_c(llms: dict[int, LLM], hf, cfg: ModelConfig, repeats: int) -> dict:
    """llms: step budget (max_num_batched_tokens) -> engine."""
    figures = {f"msem_{budget}": [] for budget in llms} | {"hf": []}
    for r in range(repeats):
        prompt = random_prompts(1, 2048, cfg.vocab_size, seed=300 + r)[0]
        for budget, llm in llms.items():
            t0 = time.perf_counter()
            msem_generate(llm, [prompt], 1)
            figures[f"msem_{budget}"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hf_generate(hf, [prompt], 1)
        figures["hf"].append(time.perf_counter() - t0)
        log(f"  (c) repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in figures.items()))
    out = {k: best_and_median(v, lower_is_better=True) for k, v in figures.items()}
    out["ratio"] = {budget: out["hf"]["best"] / out[f"msem_{budget}"]["best"] for budget in llms}
    return out


# ---- report ----

def markdown_table(res: dict) -> str:
    rows = ["| case | msem | transformers | ratio | target |", "|---|---|---|---|---|"]

    def verdict(case: str) -> str:
        met = round(res[case]["ratio"], 2) >= TARGETS[case]  # judged as displayed
        return f">= {TARGETS[case]:g}x ({'met' if met else 'not met'})"

    if "a" in res:
        a = res["a"]
        rows.append(f"| (a) 1 request, 128 in + 128 out, output tok/s | {a['msem']['best']:.1f} | "
                    f"{a['hf']['best']:.1f} | {a['ratio']:.2f}x | {verdict('a')} |")
        rows.append(f"| (a) same, decode only, tok/s | {a['msem_decode']['best']:.1f} | "
                    f"{a['hf_decode']['best']:.1f} | {a['msem_decode']['best'] / a['hf_decode']['best']:.2f}x | |")
        roof = a["roofline"]
        rows.append(f"| (a) share of bandwidth roofline ({roof['tokens_per_s']:.1f} tok/s), decode | "
                    f"{100 * roof['msem_decode_fraction']:.0f}% | "
                    f"{100 * a['hf_decode']['best'] / roof['tokens_per_s']:.0f}% | | |")
    if "b" in res:
        b = res["b"]
        rows.append(f"| (b) 32 requests, 128 in + 128 out each, total tok/s | {b['msem']['best']:.1f} | "
                    f"{b['hf']['best']:.1f} | {b['ratio']:.2f}x | {verdict('b')} |")
        bound = b["compute_bound"]["tokens_per_s"]
        rows.append(f"| (b) share of compute roofline ({bound:.0f} tok/s; {TARGETS['b']:g}x transformers needs "
                    f"{100 * TARGETS['b'] * b['hf']['best'] / bound:.0f}%) | {100 * b['msem']['best'] / bound:.0f}% | "
                    f"{100 * b['hf']['best'] / bound:.0f}% | | |")
    if "c" in res:
        c = res["c"]
        for budget, ratio in c["ratio"].items():
            label = "one step" if budget >= 2048 else f"chunked by {budget}"
            rows.append(f"| (c) TTFT, 2,048-token prompt ({label}), s (ratio HF/msem) | "
                        f"{c[f'msem_{budget}']['best']:.2f} | {c['hf']['best']:.2f} | {ratio:.2f}x | |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="a,b,c", help="comma-separated subset of a,b,c")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per case, best reported (default: a=3, b=1, c=3)")
    p.add_argument("--model", default="bench", help="preset name or checkpoint directory")
    p.add_argument("--ttft-chunk", type=int, default=512,
                   help="also time (c) with this msem step budget (chunked prefill); 0 to skip")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides run there)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--cudnn-attention", action="store_true",
                   help="let msem's SDPA take cuDNN's kernel too (mistral.attention.GPU_SDPA_BACKENDS leaves it out)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32"))
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(DEFAULT_REPEATS)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}; choose from a, b, c")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from transformers import AutoModelForCausalLM  # heavy import, after argument errors

    if args.cudnn_attention:
        attention.GPU_SDPA_BACKENDS.insert(0, SDPBackend.CUDNN_ATTENTION)
    model_dir = resolve_model(args.model)
    cfg = ModelConfig.from_dir(model_dir)
    device, dtype, dtype_name = args.device, args.dtype, str(args.dtype).removeprefix("torch.")
    res = {"model": str(model_dir), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(), "device": str(device), "dtype": dtype_name,
           "cudnn_attention": args.cudnn_attention,
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    log(f"model {model_dir}; torch {torch.__version__}, {torch.get_num_threads()} threads; {device}, {dtype_name}")
    log("measuring memory bandwidth ...")
    res["bandwidth"] = bandwidth = measure_bandwidth(device, dtype)
    log(f"  read {bandwidth['read_gb_s']:.1f} GB/s, copy {bandwidth['copy_gb_s']:.1f} GB/s")
    res["gflops"] = gflops = measure_gflops(device, dtype)
    log(f"  {dtype_name} matrix product {gflops:.0f} GFLOP/s")
    log("loading msem and transformers ...")
    llm = LLM(model=str(model_dir), dtype=dtype_name, device=str(device), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    res["hf_impl"] = {"attention": hf.config._attn_implementation,
                      "experts": getattr(hf.config, "_experts_implementation", None)}
    log("warming up ...")
    warm = random_prompts(2, 16, cfg.vocab_size, seed=0)
    msem_generate(llm, warm, 8)
    hf_generate(hf, warm, 8)

    def repeats(case: str) -> int:
        return args.repeats or DEFAULT_REPEATS[case]

    if "a" in args.cases:
        log("case (a): one request, 128 + 128 tokens")
        res["a"] = case_a(llm, hf, cfg, repeats("a"), bandwidth, dtype.itemsize)
    if "b" in args.cases:
        log("case (b): 32 concurrent requests, 128 + 128 tokens each")
        res["b"] = case_b(llm, hf, cfg, repeats("b"), gflops)
    if "c" in args.cases:
        log("case (c): time to first token, 2,048-token prompt")
        llms = {llm.engine.config.max_num_batched_tokens: llm}
        if args.ttft_chunk:
            llms[args.ttft_chunk] = LLM(model=str(model_dir), dtype=dtype_name, device=str(device), progress=False,
                                        max_num_batched_tokens=args.ttft_chunk)
            msem_generate(llms[args.ttft_chunk], warm, 2)
        res["c"] = case_c(llms, hf, cfg, repeats("c"))

    res["loadavg_end"] = os.getloadavg()
    print(f"1-min load average at start {res['loadavg_start'][0]:.1f}, at end {res['loadavg_end'][0]:.1f} "
          f"on {os.cpu_count()} CPUs: above ~1 other work shared the machine and timings are noisy")
    print(f"memory bandwidth: {bandwidth['read_gb_s']:.1f} GB/s read (torch.sum), "
          f"{bandwidth['copy_gb_s']:.1f} GB/s copy (read + write), {bandwidth['tensor_gib']:g} GiB {dtype_name} "
          f"on {res['gpu'] or device}")
    print(f"{dtype_name} matrix product: {gflops:.0f} GFLOP/s (2048 x 512 @ 512 x 1792)")
    if "a" in res:
        roof = res["a"]["roofline"]
        print(f"roofline: {roof['weight_bytes_per_token'] / 1e6:.1f} MB of weights per token -> "
              f"{roof['tokens_per_s']:.1f} tok/s")
    print(f"transformers implementations: {res['hf_impl']}")
    print(markdown_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=str)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
