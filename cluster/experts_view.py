"""What `msem experts` draws: pure functions from the `/v1/experts` JSON to a `rich` view or a PNG.

The heatmap shows, for every layer (row) and logical expert (column), the share of that layer's routed token
slots which went to the expert, in percent. Each row sums to 100, and an even spread puts 100/E in every cell,
so the colour scale is centred there: blue below the even share, grey at it, red above it, saturating at
twice it (matplotlib's `coolwarm`, in the terminal and in the PNG alike). With 8 experts, a cell of 25.0 is
an expert that saw twice its even share.

The load shown is the server's sliding window, which the balancedness and the rebalancer also use; when the
window is empty (an idle server) the view falls back to the totals since start and says so. Balancedness of a
layer is the mean over the max of its group loads in the window (1.0 is perfect), computed by the server.

A group's slots are listed per layer, consecutive layers with the same slots on one line ("L0-3  0 1 4+ ·").
An expert with copies in several groups in a layer is marked `+` in each of them (a redundant copy, placed by a
rebalance), an empty redundant slot `·`.
"""

import time
from collections.abc import Sequence

from rich.color import Color
from rich.console import Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

# matplotlib's coolwarm at 0, 0.5 and 1, so the terminal and the PNG read alike.
COLD, EVEN, HOT = (59, 76, 192), (221, 221, 221), (180, 4, 38)
REDUNDANT_MARK, EMPTY_SLOT = "+", "·"
# (least balancedness, terminal style, matplotlib colour): good, fair, poor.
BALANCE_GRADES = ((0.9, "green", "tab:green"), (0.7, "yellow", "tab:orange"), (0.0, "red", "tab:red"))


def heatmap_load(info: dict) -> tuple[list[list[float]], str, bool]:
    """The [L][E] token counts to draw, a phrase naming where they come from, and whether that is the window."""
    window, load = info["load"]["window"], info["load"]
    if any(any(row) for row in window["per_layer_expert"]):
        return window["per_layer_expert"], f"the last {window['seconds']:.0f} s", True
    if not any(any(row) for row in load["per_layer_expert"]):
        return load["per_layer_expert"], f"nothing routed yet ({load['seconds']:.0f} s since start)", False
    return load["per_layer_expert"], (f"since start ({load['seconds']:.0f} s; nothing routed in the last "
                                      f"{window['seconds']:.0f} s)"), False


def layer_shares(load: Sequence[Sequence[float]]) -> list[list[float]]:
    """Each layer's token counts as percentages of the layer's total; a layer that routed nothing is all 0."""
    return [[100.0 * tokens / total if (total := sum(row)) else 0.0 for tokens in row] for row in load]


def copy_counts(info: dict) -> list[list[int]]:
    """[L][E]: in how many groups each expert has a slot in each layer."""
    counts = [[0] * info["num_experts"] for _ in range(info["num_layers"])]
    for group in info["groups"]:
        for layer, slots in enumerate(group["slots"]):
            for expert in slots:
                counts[layer][expert] += 1
    return counts


def heat_colour(share: float, num_experts: int) -> tuple[int, int, int]:
    """RGB of a cell: COLD at 0, EVEN at the even share 100/E, HOT at twice it and above."""
    even = 100.0 / num_experts
    low, high, t = (COLD, EVEN, share / even) if share <= even else (EVEN, HOT, min(share / even - 1.0, 1.0))
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high))


def render(info: dict, url: str = "") -> RenderableType:
    """The whole terminal view: a header, the heatmap with balancedness per layer, the groups."""
    load, source, has_window_load = heatmap_load(info)
    return Group(_header(info, url), "",
                 Text(f"share of each layer's routed tokens (%), {source}", style="bold"),
                 _heatmap(info, load, has_window_load),
                 Text(f"even share {100 / info['num_experts']:.1f}; {REDUNDANT_MARK} an expert with copies in "
                      "several groups; balancedness: mean / max group load in the window (1.0 is perfect)",
                      style="dim"), "",
                 Text("groups", style="bold"), _groups(info),
                 Text(f"tokens: since start; {REDUNDANT_MARK} a copy also held by another group, {EMPTY_SLOT} an "
                      "empty slot", style="dim"))


def _header(info: dict, url: str) -> Text:
    rebalance = info["rebalance"]
    groups = info["groups"]
    text = Text()
    text.append("expert load", style="bold")
    text.append(f"  {url}\n" if url else "\n")
    text.append(f"{info['num_layers']} layers x {info['num_experts']} experts in {len(groups)} groups of "
                f"{info['slots_per_group']} slots per layer; placement v{info['placement_version']}, "
                f"routing table v{info['table_version']}\n")
    if rebalance["enabled"]:
        text.append(f"rebalance: every {rebalance['interval_s']:g} s over the last {rebalance['window_s']:g} s "
                    f"when balancedness gains at least {rebalance['min_gain']:g}")
    else:
        text.append("rebalance: on request only (msem experts rebalance)")
    if rebalance.get("pending_version") is not None:
        text.append(f"\nplacement v{rebalance['pending_version']} pending: the group replicas are loading its experts")
    text.append(f"\nlast rebalance: {describe_rebalance(rebalance['last']) if rebalance['last'] else 'never'}")
    if info.get("lost_groups"):
        text.append(f"\ngroups {info['lost_groups']} lost every replica: the other groups serve their experts until "
                    f"a replica is back (then placement v{info['home_version']}'s slots return)", style="red")
    return text


def _heatmap(info: dict, load: list[list[float]], has_window_load: bool) -> Table:
    num_experts = info["num_experts"]
    balancedness = info["balancedness"]
    table = Table(show_footer=True, pad_edge=False, box=None, padding=(0, 1))
    table.add_column("layer", footer="mean", justify="right")
    for expert in range(num_experts):
        table.add_column(f"e{expert}", justify="right")
    table.add_column("balancedness", footer=_balancedness(balancedness["mean"], has_window_load), justify="right")
    copies = copy_counts(info)
    for layer, shares in enumerate(layer_shares(load)):
        cells = [_cell(share, num_experts, copies[layer][expert] > 1) for expert, share in enumerate(shares)]
        table.add_row(str(layer), *cells, _balancedness(balancedness["per_layer"][layer], has_window_load))
    return table


def _cell(share: float, num_experts: int, is_replicated: bool) -> Text:
    rgb = heat_colour(share, num_experts)
    style = Style(color=_text_colour(rgb), bgcolor=Color.from_rgb(*rgb))
    return Text(f"{share:.1f}{REDUNDANT_MARK if is_replicated else ' '}", style=style)


def _balancedness(value: float, has_load: bool) -> Text:
    if not has_load:
        return Text("-", style="dim")  # nothing in the window to measure
    return Text(f"{value:.2f}", style=_grade(value)[1])


def _grade(value: float) -> tuple[float, str, str]:
    return next(grade for grade in BALANCE_GRADES if value >= grade[0])


def _groups(info: dict) -> Table:
    table = Table(pad_edge=False, box=None, padding=(0, 2))
    for name, justify in (("group", "right"), ("replicas (tokens served)", "left"), ("tokens", "right"),
                          ("slots per layer", "left")):
        table.add_column(name, justify=justify)
    copies = copy_counts(info)
    per_group = info["load"]["per_group"]
    for group in info["groups"]:
        replicas = Text("\n").join(map(_replica_line, group["replicas"])) or Text("none", style="red")
        labels = {(first, last): f"L{first}" if first == last else f"L{first}-{last}"
                  for first, last in layer_runs(group["slots"])}
        width = max(map(len, labels.values()))
        slots = Text("\n").join(_slot_line(label.ljust(width), group["slots"][first], copies[first],
                                           info["slots_per_group"]) for (first, _), label in labels.items())
        table.add_row(str(group["group"]), replicas, f"{per_group[group['group']]:,.0f}", slots)
    return table


def _replica_line(replica: dict) -> Text:
    line = Text(f"{replica['replica_id']}  {replica['tokens_served']:,}")
    if replica.get("last_heartbeat_s") is not None:
        line.append(f"  beat {replica['last_heartbeat_s']:.1f} s ago", style="dim")
    if replica.get("alive") is False:
        line.append("  dead", style="red")
    return line


def layer_runs(slots: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(first, last) layer of each run of consecutive layers holding the same slots."""
    runs: list[tuple[int, int]] = []
    for layer, held in enumerate(slots):
        if runs and list(slots[runs[-1][0]]) == list(held):
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def _slot_line(label: str, held: Sequence[int], copies: Sequence[int], slots_per_group: int) -> Text:
    line = Text(label, style="dim")
    line.append("  ")
    for expert in held:
        line.append(f"{expert}{REDUNDANT_MARK}" if copies[expert] > 1 else str(expert),
                    style="magenta" if copies[expert] > 1 else "")
        line.append(" ")
    line.append(" ".join(EMPTY_SLOT * (slots_per_group - len(held))), style="dim")
    return line


def describe_rebalance(result: dict) -> str:
    """One line for a rebalance's answer or the server's last one (which adds why and when), e.g.
    "placement v3: balancedness 0.62 -> 0.94, 5 expert copies moved, applied (requested at 14:02:07)"."""
    text = (f"placement v{result['placement_version']}: balancedness {result['balancedness_before']:.2f} -> "
            f"{result['balancedness_after']:.2f}, {result['moved']} expert copies moved, {result['status']}")
    if "reason" in result:
        text += f" ({result['reason']} at {time.strftime('%H:%M:%S', time.localtime(result['at']))})"
    return text + (f": {result['message']}" if "message" in result else "")


def write_png(info: dict, path, url: str = "") -> None:
    """The heatmap and the balancedness per layer as a PNG (matplotlib's Agg backend: no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    num_layers, num_experts = info["num_layers"], info["num_experts"]
    load, source, has_window_load = heatmap_load(info)
    shares = layer_shares(load)
    even = 100.0 / num_experts
    figure = Figure(figsize=(max(6.5, 0.65 * num_experts + 4.0), max(3.2, 0.32 * num_layers + 1.8)),
                    layout="constrained")
    FigureCanvasAgg(figure)
    heat, bars = figure.subplots(1, 2, sharey=True, width_ratios=(num_experts, max(2.5, num_experts / 3)))
    image = heat.imshow(shares, cmap="coolwarm", norm=TwoSlopeNorm(vmin=0.0, vcenter=even, vmax=2 * even),
                        aspect="auto", interpolation="nearest")
    figure.colorbar(image, ax=heat, location="left", extend="max", label=f"% of the layer's tokens (even: {even:.1f})")
    heat.set(xticks=range(num_experts), yticks=range(num_layers), xlabel="expert", ylabel="layer",
             title=f"expert load, {source}")
    copies = copy_counts(info)
    for layer, row in enumerate(shares):
        for expert, share in enumerate(row):
            replicated = copies[layer][expert] > 1
            if num_layers * num_experts <= 512:  # beyond that the numbers would not fit in the cells
                heat.text(expert, layer, f"{share:.1f}" + (f"\n×{copies[layer][expert]}" if replicated else ""),
                          ha="center", va="center", fontsize=7, color=_text_colour(heat_colour(share, num_experts)))
            if replicated:
                heat.add_patch(Rectangle((expert - 0.42, layer - 0.42), 0.84, 0.84, fill=False, lw=2, ec="black"))
    balancedness = info["balancedness"]
    bars.barh(range(num_layers), balancedness["per_layer"], color=[_grade(b)[2] for b in balancedness["per_layer"]])
    bars.axvline(balancedness["mean"], color="black", lw=1, ls="--")
    bars.set(xlim=(0, 1), xlabel="mean / max group load",
             title=f"balancedness, mean {balancedness['mean']:.2f}" if has_window_load
             else "balancedness: no load in the window")
    figure.suptitle(f"placement v{info['placement_version']}: {len(info['groups'])} groups x "
                    f"{info['slots_per_group']} slots per layer; outlined (×n): an expert with copies in n groups"
                    + (f"\n{url}" if url else ""), fontsize=9)
    figure.savefig(path, dpi=120)


def _text_colour(rgb: tuple[int, int, int]) -> str:
    """White on dark cells, black on light ones."""
    return "white" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140 else "black"
