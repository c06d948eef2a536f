"""The plan as the table ``ptmrec plan`` prints (``--json`` prints the dict itself)."""

from __future__ import annotations

from ptmrec_dist.plan.planner import GIB

ROWS = ("parameters_trainable", "parameters_frozen", "gradients", "optimizer", "activations",
        "zero_buffers", "buffers", "total")
LABELS = {"parameters_trainable": "parameters (trainable)",
          "parameters_frozen": "parameters (frozen)", "gradients": "gradients",
          "optimizer": "optimizer states", "activations": "activations",
          "zero_buffers": "ZeRO buffers", "buffers": "buffers (recommender)", "total": "total"}


def _gib(x: float) -> str:
    return f"{x / GIB:10.3f}"


def _header(plan: dict) -> list[str]:
    """What was planned: the setup, the parameter counts and the towers' activations."""
    zero, counts = plan["zero"], plan["counts"]
    offloads = [f"{k.split('_')[1]}->{zero[k]}" for k in ("offload_optimizer", "offload_param")
                if zero[k] != "none"]
    backbone = counts["backbone"]
    lines = [
        f"stage 2 plan, per rank: {plan['method']} on {plan['backbone']}; "
        f"{plan['world_size']} rank(s), micro batch {plan['micro_batch']}, {plan['precision']}, "
        f"ZeRO-{zero['stage']}{' (' + ', '.join(offloads) + ')' if offloads else ''}, "
        f"attention {plan['attn_implementation']}, activation checkpointing "
        f"{'on' if plan['activation_checkpointing'] else 'off'}",
        f"backbone parameters: {backbone['trainable']:,} trainable, {backbone['frozen']:,} frozen",
    ]
    rec = counts["recommender"]
    if rec is not None:
        lines.append(f"recommender {rec['name']}: {rec['trainable']:,} trainable "
                     f"({rec['n_users']:,} users x {rec['n_items']:,} items from {rec['source']})")
    towers = ", ".join(f"{k} {v['tokens']} tokens x {v['layers_saving']}/{v['layers']} layers "
                       f"saving" for k, v in plan["activations_detail"]["towers"].items())
    lines.append(f"activations: {towers}")
    return lines


def format_plan(plan: dict) -> str:
    lines = _header(plan)
    lines.append("")
    lines.append(f"{'':26s}{'device GiB':>10s}  {'host GiB':>10s}")
    for key in ROWS:
        row = plan["rows"][key]
        if key == "total":
            lines.append("-" * 48)
        lines.append(f"{LABELS[key]:26s}{_gib(row['device'])}  {_gib(row['host'])}")
    lines.append(f"(total = parameters + optimizer + buffers + max(gradients, activations); "
                 f"both: {plan['upper_bound_device'] / GIB:.3f} GiB)")
    suggestion = plan["suggestion"]
    if suggestion["micro_batch"]:
        lines.append(f"suggested micro batch for {suggestion['device_memory_gib']:g} GiB "
                     f"({suggestion['headroom']:.0%} headroom): {suggestion['micro_batch']} per "
                     f"rank (global {suggestion['global_batch']}), total "
                     f"{suggestion['total_gib']:.3f} GiB")
    else:
        lines.append(f"no micro batch fits {suggestion['device_memory_gib']:g} GiB "
                     f"({suggestion['headroom']:.0%} headroom): {suggestion['reason']}")
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
