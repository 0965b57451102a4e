"""Plain-text rendering of a plan for --dry-run (no rich/torch import on the fast path)."""

from __future__ import annotations

from launcher.plan import Plan


def kv_table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * min(100, width + 2 + max(len(v) for _, v in rows))
    return "\n".join([title, line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


def plan_table(plan: Plan) -> str:
    run, lay, b, prof, mem = plan.run, plan.layout, plan.batch, plan.profile, plan.memory
    row = b.table_row
    if row:
        source = (
            f"table row {row['sender']}-{row['receiver'] or '(single)'}: micro {row['micro_batch']} x accum "
            f"{row['grad_accum']} = {row['effective_batch']} @ seq {row['seq_len']}, {row['gpu_memory_gb']} GB "
            f"({row['provenance']})"
        )
    else:
        source = {"estimate": "memory model (no table row)", "flag": "--micro-batch"}.get(b.source, b.source)
    comps = ", ".join(f"{k} {v:.1f}" for k, v in mem["components"].items())
    rows = [
        ("run", f"{run.name}  ->  {run.run_dir}"),
        ("pair", f"{run.sender} -> {run.receiver}"),
        ("mode", f"{plan.mode} (device {plan.device}), backend {run.backend}"),
        ("layout", f"{lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) = world size {lay.world_size}"),
        ("cluster", f"{prof.name}: {prof.gpus_per_node} x {prof.gpu_memory_gb:g} GB per node"),
        ("batch source", source),
        ("micro-batch", f"{b.micro_batch} per GPU (memory model fits up to {b.max_micro_batch_estimate})"),
        ("grad accum", str(b.grad_accum)),
        ("global batch", f"{b.global_batch} (target {b.target_global_batch})"),
        ("memory / GPU", f"{mem['total_gib']:.1f} GiB estimated at micro-batch {b.micro_batch} ({comps})"),
        (
            "task",
            f"{run.data.task}, sender max {run.data.max_length} tokens, {run.train.steps} steps, lr {run.train.lr:g}",
        ),
        ("bridge", f"K={run.bridge.soft_tokens}, depth {run.bridge.depth}, heads {_heads(plan)}"),
    ]
    out = kv_table("plan", rows)
    for note in b.notes:
        out += f"\nnote: {note}"
    return out


def _heads(plan: Plan) -> str:
    b = plan.run.bridge
    width = plan.shape.pair.receiver.hidden
    return str(b.heads) if b.heads is not None else f"{b.heads_for(width)} (width {width} / head_dim {b.head_dim})"
