"""`msem generate`: stream a completion (or a chat answer) to the terminal.

    msem generate --model tiny --prompt "Hello"
    msem generate --model DIR --chat --prompt "Write a haiku" --max-tokens 64 --temperature 0.7 --seed 1
    msem generate --model tiny --interactive          # one prompt per line on stdin until EOF
    msem generate --model tiny --prompt "Hello" --expert-groups 2 --transport grpc
"""

import argparse
import sys

from engine.errors import InvalidRequestError
from experts.parallel_config import TRANSPORTS, ExpertParallelConfig
from experts.placement import PlacementError


def add_generate_command(commands) -> None:
    gen = commands.add_parser("generate", help="generate text from a prompt, streaming to the terminal")
    gen.add_argument("--model", default="tiny", help="checkpoint directory or preset name (default: tiny)")
    gen.add_argument("--prompt", help="the prompt text (omit with --interactive)")
    gen.add_argument("--chat", action="store_true", help="treat the prompt as a user message (instruct format)")
    gen.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    gen.add_argument("--seed", type=int, help="seed for reproducible sampling")
    gen.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    gen.add_argument("--tokenizer", help="bundled tokenizer name (v1, v2, v3, v7, tekken) instead of the model's")
    gen.add_argument("--max-model-len", type=int, help="context length to serve (default: the model's)")
    ep = gen.add_argument_group("expert parallelism (Ray; joins RAY_ADDRESS or starts a local cluster)")
    ep.add_argument("--expert-groups", type=int, default=0,
                    help="run the experts in N expert-group processes (default: 0, in this process)")
    ep.add_argument("--transport", choices=TRANSPORTS, default="ray",
                    help="how tokens reach the expert groups each layer (default: ray)")
    ep.add_argument("--placement", default="linear", help="linear, round_robin, or comma-separated group ids "
                    "one per expert (default: linear)")
    ep.add_argument("--replicas", type=int, default=1, help="replicas per expert group (default: 1)")
    gen.set_defaults(run=run_generate)


def expert_parallel_config(args: argparse.Namespace) -> ExpertParallelConfig | None:
    if not args.expert_groups:
        return None
    placement = args.placement
    if "," in placement or placement.isdigit():
        try:
            placement = tuple(int(g) for g in placement.split(","))
        except ValueError:
            raise PlacementError(f"--placement {args.placement!r}: expected linear, round_robin or "
                                 "comma-separated group ids") from None
    return ExpertParallelConfig(num_groups=args.expert_groups, transport=args.transport, placement=placement,
                                replicas=args.replicas)


def run_generate(args: argparse.Namespace) -> int:
    from engine import LLM, SamplingParams  # heavy imports only for this command

    if not args.interactive and args.prompt is None:
        raise InvalidRequestError("give --prompt TEXT, or --interactive to read prompts from stdin")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_model_len=args.max_model_len,
              expert_parallel=expert_parallel_config(args))
    with llm:
        return _generate(llm, args, params)


def _generate(llm, args: argparse.Namespace, params) -> int:
    if not args.interactive:
        _stream(llm, args.prompt, params, args.chat)
        return 0
    print(f"msem: {args.model} ready; type a prompt and press Enter (Ctrl-D to quit)", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            try:
                _stream(llm, line.rstrip("\n"), params, args.chat)
            except InvalidRequestError as err:
                print(f"error: {err}", file=sys.stderr)
    return 0


def _stream(llm, prompt: str, params, chat: bool) -> None:
    messages = [{"role": "user", "content": prompt}] if chat else prompt
    finish = None
    for delta in llm.stream(messages, params, chat=chat):
        for completion in delta.outputs:
            sys.stdout.write(completion.text)
            sys.stdout.flush()
            finish = completion.finish_reason or finish
    sys.stdout.write("\n")
    print(f"[finish_reason: {finish}]", file=sys.stderr)
