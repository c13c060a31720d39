"""`msem`: the command line.

Each subcommand is registered by a small `_add_*` function that builds its parser and sets `run` to its
handler, so adding one is one function plus one line in `build_parser`. User mistakes (a missing model
directory, an unknown preset, a bad config or checkpoint) print `error: <message>` on stderr and exit with
status 2, like argparse's own usage errors; they never show a traceback. `msem serve` stopped by Ctrl-C or
SIGTERM drains, shuts down what it started and exits with status 0 (cluster/serve_command.py).

    msem serve [--config configs/tiny.yaml]  # HTTP (OpenAI API) + gRPC on Ray Serve; prints the endpoints
    msem generate --model tiny --prompt "Hello" [--chat] [--max-tokens N --temperature T --top-p P --seed S]
    msem checkpoint create --preset tiny --out ./tiny-hf [--format hf|consolidated] [--max-shard-size MB]
    msem checkpoint inspect mixtral-8x7b      # a preset (config-only ones too) or a checkpoint directory
    msem experts [--watch] [--png FILE]       # a running server's expert load; `msem experts rebalance`
    msem dashboard install [--session-dir D]  # msem's Grafana dashboard, beside Ray's own
"""

import argparse
import json
import sys
from pathlib import Path

from cluster.capacity import add_capacity_command
from cluster.client import add_client_command
from cluster.dashboard_command import add_dashboard_command
from cluster.deployment_plan import add_plan_command
from cluster.experts_command import add_experts_command
from cluster.generate import add_generate_command
from cluster.serve_command import DeployFailedError, add_serve_command
from engine.errors import EngineConfigError, InvalidRequestError
from engine.tokenizer import TokenizerNotFoundError, UnknownTokenizerError
from experts.placement import PlacementError
from mistral.checkpoint import CheckpointReader
from mistral.config import ModelConfig
from mistral.errors import CheckpointError, ConfigError, ModelNotFoundError
from mistral.presets import PRESETS, model_not_found, write_preset

# Errors that mean "the user asked for something we cannot do", answered with a message, not a traceback.
USER_ERRORS = (ModelNotFoundError, ConfigError, CheckpointError, FileExistsError, InvalidRequestError,
               EngineConfigError, TokenizerNotFoundError, UnknownTokenizerError, PlacementError,
               DeployFailedError)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msem", description="Serve Mistral-family dense and MoE models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_command(commands)
    add_client_command(commands)
    add_serve_command(commands)
    add_dashboard_command(commands)
    add_experts_command(commands)
    add_capacity_command(commands)
    add_plan_command(commands)
    _add_checkpoint_commands(commands)
    return parser


# ---- msem checkpoint ... ----

def _add_checkpoint_commands(commands) -> None:
    checkpoint = commands.add_parser("checkpoint", help="create preset checkpoints; inspect model shapes")
    actions = checkpoint.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", help="write a preset's deterministic random-weight checkpoint")
    runnable = ", ".join(name for name, preset in PRESETS.items() if not preset.is_config_only)
    create.add_argument("--preset", required=True, help=f"preset to write ({runnable})")
    create.add_argument("--out", required=True, type=Path, help="new or empty directory to write into")
    create.add_argument("--format", choices=("hf", "consolidated"), default="hf",
                        help="Hugging Face (config.json + model*.safetensors) or Mistral consolidated "
                             "(params.json + consolidated.safetensors); default: hf")
    create.add_argument("--max-shard-size", type=float, metavar="MB",
                        help="split hf weights into shards of at most MB megabytes (10^6 bytes) each")
    create.set_defaults(run=_run_create, parser=create)

    inspect = actions.add_parser("inspect", help="print a model's shape, parameter counts and memory needs")
    inspect.add_argument("model", metavar="MODEL",
                         help=f"checkpoint directory or preset name ({', '.join(PRESETS)}); writes nothing")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(run=_run_inspect)


def _run_create(args) -> int:
    max_shard_bytes = None
    if args.max_shard_size is not None:
        if args.format != "hf":
            args.parser.error("--max-shard-size applies to --format hf only")
        if args.max_shard_size <= 0:
            args.parser.error("--max-shard-size must be > 0")
        max_shard_bytes = int(args.max_shard_size * 1_000_000)
    out = write_preset(args.preset, args.out, fmt=args.format, max_shard_bytes=max_shard_bytes)
    params = PRESETS[args.preset].config.num_params()
    print(f"wrote preset {args.preset} ({_count(params)} params, {args.format} format) to {out}")
    return 0


def _run_inspect(args) -> int:
    path = Path(args.model).expanduser()
    problem = None
    if path.is_dir():
        reader = CheckpointReader(path)
        config, source = reader.config, _checkpoint_facts(reader)
        try:
            reader.check_complete()
        except CheckpointError as err:
            problem = err  # reported after the facts, which help to diagnose it
    elif args.model in PRESETS:
        preset = PRESETS[args.model]
        config = preset.config
        source = {"preset": preset.name, "description": preset.description,
                  "weights": "none (config-only)" if preset.is_config_only else "deterministic random",
                  "tokenizer": preset.tokenizer or "none"}
    else:
        raise model_not_found(args.model)
    report = {"source": source, "config": config.summary(), **model_report(config)}
    print(json.dumps(report, indent=2) if args.json else _format_report(report))
    if problem is not None:
        raise problem
    return 0


def model_report(config: ModelConfig) -> dict:
    """Parameter counts and memory needs of `config` (plain numbers; formatting is the caller's)."""
    report = {
        "params": {"total": config.num_params(), "active_per_token": config.num_params(active_only=True)},
        "weights_bytes": {d: config.num_params() * b for d, b in DTYPE_BYTES.items()},
        "kv_bytes_per_token": {d: config.kv_bytes_per_token(b) for d, b in DTYPE_BYTES.items()},
    }
    # Sliding-window attention keeps at most `sliding_window` positions of KV per sequence.
    context = min(config.sliding_window or config.max_position_embeddings, config.max_position_embeddings)
    report["kv_bytes_per_sequence"] = {"tokens": context,
                                       **{d: context * b for d, b in report["kv_bytes_per_token"].items()}}
    if config.is_moe:
        report["experts"] = {
            "per_layer": config.num_experts, "active_per_token": config.num_experts_per_tok,
            "total": config.num_experts * config.num_layers, "params_per_expert": config.num_expert_params,
            "bytes_per_expert": {d: config.num_expert_params * b for d, b in DTYPE_BYTES.items()},
        }
    return report


def _checkpoint_facts(reader: CheckpointReader) -> dict:
    files = sorted(p for p in reader.path.iterdir() if p.suffix == ".safetensors")
    tokenizers = sorted(p.name for p in reader.path.iterdir()
                        if p.name.startswith("tokenizer.model") or p.name == "tekken.json")
    return {"directory": str(reader.path), "format": reader.format, "tensors": len(reader.names),
            "files": [p.name for p in files], "bytes_on_disk": sum(p.stat().st_size for p in files),
            "tokenizer": ", ".join(tokenizers) or "none found"}


def _format_report(report: dict) -> str:
    lines = []
    source = report["source"]
    for key, value in source.items():
        if key == "bytes_on_disk":
            value = _bytes(value)
        elif isinstance(value, list):
            value = ", ".join(value)
        lines.append(f"{key:<26}{value}")
    lines.append("config:")
    lines += [f"  {key:<24}{value}" for key, value in report["config"].items()]
    params = report["params"]
    lines += ["parameters:",
              f"  {'total':<24}{_count(params['total'])} ({params['total']:,})",
              f"  {'active per token':<24}{_count(params['active_per_token'])} ({params['active_per_token']:,})"]
    if "experts" in report:
        experts = report["experts"]
        lines += ["experts:",
                  f"  {'per layer':<24}{experts['per_layer']} (top-{experts['active_per_token']} per token; "
                  f"{experts['total']} in all)",
                  f"  {'params per expert':<24}{_count(experts['params_per_expert'])}",
                  f"  {'bytes per expert':<24}{_per_dtype(experts['bytes_per_expert'])}"]
    kv_seq = report["kv_bytes_per_sequence"]
    lines += ["memory:",
              f"  {'weights':<24}{_per_dtype(report['weights_bytes'])}",
              f"  {'kv cache per token':<24}{_per_dtype(report['kv_bytes_per_token'])}",
              f"  {'kv cache per sequence':<24}"
              f"{_per_dtype({d: kv_seq[d] for d in DTYPE_BYTES})} (at {kv_seq['tokens']:,} tokens)"]
    return "\n".join(lines)


def _per_dtype(values: dict) -> str:
    return "  ".join(f"{dtype} {_bytes(n)}" for dtype, n in values.items())


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
