"""Will it fit? The planned peak memory of a training run, and what fits in common memory sizes, from a
model's config.json alone (nothing downloaded but the config, no weights).

    python tools/plan.py --model Qwen3-8B --seq 2048 --r 64
    python tools/plan.py --model path/to/model_dir --device cpu
    python tools/plan.py --model Qwen3-0.6B,gemma-3-1b,Llama-3.1-8B      # one summary row per model

--model takes a shipped architecture (configs/models/NAME.json), a config.json file, a model directory or a
hub id. The run is Fine-tuning/01_Train.py's defaults with the flags applied, planned by the same functions
the script uses before it loads weights (qlora.planner.memory.plan_for_train_config). For each budget the table
gives the largest LoRA rank (at --seq) and the largest sequence length (at --r) whose training fits, and
whether the whole flow (the generation check, the streamed merge and its check too) fits; each phase has a row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUDGETS_GIB = (8, 12, 16, 24, 48, 80)
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
MIN_SEQ = 256

def model_source(model: str) -> str:
    """A shipped architecture's config.json for its name; anything else as given (file, dir, hub id)."""
    from qlora.model.fixtures import MODEL_CONFIGS_DIR

    shipped = MODEL_CONFIGS_DIR / f"{model}.json"
    return str(shipped) if shipped.is_file() and not Path(model).exists() else model

def train_config(args) -> dict:
    """01_Train.py's constants with this command's flags applied, validated as the script validates them."""
    from qlora.config import training_defaults, validate_config

    cfg = training_defaults()
    cfg.update(lora_r=args.r, max_seq_length=args.seq, per_device_train_batch_size=args.batch, optim=args.optim,
               QUANT_METHOD=args.method, gradient_checkpointing=args.gradient_checkpointing,
               merge_after_train=args.merge)
    validate_config(cfg)
    return cfg

def peaks(model_cfg: dict, cfg: dict, device: str) -> tuple[int, int | None]:
    """(training peak, whole-flow peak or None) in bytes: loading, data and training; and every phase, the
    generation check, streamed merge and merge check included (None without a merge)."""
    plan = phase_peaks(model_cfg, cfg, device)
    training = max(plan[name] for name in ("loading", "data", "training") if plan.get(name))
    return training, (max(plan.values()) if cfg["merge_after_train"] else None)

def phase_peaks(model_cfg: dict, cfg: dict, device: str) -> dict[str, int]:
    """Planned peak bytes of each phase of the run, in the order they come."""
    from qlora.planner.memory import PHASES, plan_for_train_config

    plan = plan_for_train_config(model_cfg, cfg, device)
    if plan.get("peak_gib") is None:
        raise SystemExit(f"error: {plan['reason']}")
    return {name: plan[key] for name, key in PHASES.items() if plan.get(key)}

def largest(values, fits) -> int | None:
    """The largest of the ascending `values` for which `fits(value)` holds (peaks grow with each), or None."""
    best = None
    for value in values:
        if not fits(value):
            break
        best = value
    return best

def sequence_lengths(model_cfg: dict) -> list[int]:
    context = model_cfg.get("max_position_embeddings") or 131072
    lengths, seq = [], MIN_SEQ
    while seq <= context:
        lengths.append(seq)
        seq *= 2
    return lengths

def fit_table(model_cfg: dict, cfg: dict, device: str, budgets) -> list[dict]:
    """Per budget (GiB): whether the run as given trains and merges within it, the largest rank at its
    sequence length and the largest sequence length at its rank whose training fits."""
    from qlora.core.memory import GIB

    training, merge = peaks(model_cfg, cfg, device)
    rows = []
    for budget in budgets:
        limit = budget * GIB
        rows.append({
            "budget_gib": budget, "training_fits": training <= limit, "merge_fits": merge is None or merge <= limit,
            "largest_r": largest(RANKS, lambda r: peaks(model_cfg, {**cfg, "lora_r": r}, device)[0] <= limit),
            "largest_seq": largest(sequence_lengths(model_cfg),
                                   lambda s: peaks(model_cfg, {**cfg, "max_seq_length": s}, device)[0] <= limit)})
    return rows

def _cell(value) -> str:
    return "-" if value is None else str(value)

def render_model(name: str, model_cfg: dict, cfg: dict, device: str, budgets) -> str:
    from qlora.core.memory import GIB
    from qlora.planner.memory import PHASE_WORDS, format_plan, parameter_counts, plan_for_train_config

    plan = plan_for_train_config(model_cfg, cfg, device)
    params = sum(parameter_counts(model_cfg).values())
    where = "CUDA max allocated" if device == "cuda" else "peak RSS"
    lines = [f"{name}: {params / 1e9:.2f}B parameters, vocabulary {model_cfg['vocab_size']:,}; {cfg['QUANT_METHOD']} "
             f"r={cfg['lora_r']}, seq {cfg['max_seq_length']}, batch {cfg['per_device_train_batch_size']}, "
             f"gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}, {cfg['optim']}, {device} "
             f"({where})", "", "| phase | planned GiB |", "|---|---|"]
    for phase, value in phase_peaks(model_cfg, cfg, device).items():
        lines.append(f"| {PHASE_WORDS.get(phase, phase)} | {value / GIB:.2f} |")
    lines += ["", f"  {format_plan(plan)}", "",
              f"| budget GiB | trains as given | merges (whole flow) | largest r (seq {cfg['max_seq_length']}) | "
              f"largest seq (r={cfg['lora_r']}) |", "|---|---|---|---|---|"]
    for row in fit_table(model_cfg, cfg, device, budgets):
        lines.append(f"| {row['budget_gib']} | {'yes' if row['training_fits'] else 'no'} | "
                     f"{'yes' if row['merge_fits'] else 'no'} | {_cell(row['largest_r'])} | {_cell(row['largest_seq'])} |")
    return "\n".join(lines)

def render_summary(models: dict[str, dict], cfg: dict, device: str, budgets) -> str:
    """One row per model: for each budget, the largest rank at --seq / the largest seq at --r."""
    from qlora.core.memory import GIB

    lines = [f"{cfg['QUANT_METHOD']}, seq {cfg['max_seq_length']}, r={cfg['lora_r']}, batch "
             f"{cfg['per_device_train_batch_size']}, {cfg['optim']}, {device}; cell: largest r at seq "
             f"{cfg['max_seq_length']} / largest seq at r={cfg['lora_r']} whose loading and training fit (- : none)", "",
             "| model | load + train GiB | whole flow GiB | " + " | ".join(f"{b} GiB" for b in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for name, model_cfg in models.items():
        training, merge = peaks(model_cfg, cfg, device)
        cells = [f"{_cell(row['largest_r'])} / {_cell(row['largest_seq'])}"
                 for row in fit_table(model_cfg, cfg, device, budgets)]
        lines.append(f"| {name} | {training / GIB:.2f} | {'' if merge is None else f'{merge / GIB:.2f}'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)

def main(argv=None) -> str:
    from qlora.train.options import OPTIMIZERS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="shipped architecture name (configs/models), config.json file, model dir or hub id; "
                             "comma-separated for one summary row each")
    parser.add_argument("--seq", type=int, default=1024, help="max_seq_length: tokens per row")
    parser.add_argument("--r", type=int, default=64, help="lora_r: LoRA rank")
    parser.add_argument("--batch", type=int, default=1, help="per_device_train_batch_size")
    parser.add_argument("--optim", default="paged_adamw_8bit", choices=sorted(OPTIMIZERS), help="optimizer")
    parser.add_argument("--method", default="QLORA", choices=("QLORA", "NONE"), help="QLORA (4-bit base) or NONE (bf16)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in backward (default on)")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                        help="merge_after_train: plan the merge too (default on)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda plans max allocated on one GPU; cpu plans the process's peak RSS")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS_GIB)), help="GiB sizes to tabulate")
    args = parser.parse_args(argv)
    from qlora.core.errors import UserError
    from qlora.model.loading import read_model_config

    try:
        budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",") if b.strip()]
        cfg = train_config(args)
        names = [m.strip() for m in args.model.split(",") if m.strip()]
        models = {name: read_model_config(model_source(name), args.seq) for name in names}
    except (UserError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if len(models) == 1:
        text = render_model(names[0], models[names[0]], cfg, args.device, budgets)
    else:
        text = render_summary(models, cfg, args.device, budgets)
    print(text)
    return text

if __name__ == "__main__":
    main()
