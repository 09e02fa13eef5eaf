"""The benchmark's report: the planner's prediction beside each measured case and ratios within one run, the
tables (memory, throughput, larger architectures extrapolated), and the JSON file the results are kept in."""

from __future__ import annotations

import json
from pathlib import Path

from qlora.bench.cases import benchmark_architecture
from qlora.core.memory import GIB
from qlora.model.fixtures import architecture_dimensions
from qlora.planner.memory import (TOKENIZE_BYTES_PER_TOKEN, TrainingSetup, parameter_counts, plan_load_memory,
                                  plan_training_memory)


def peak_gib(result: dict) -> float:
    peak = result["peak"]
    return peak["overall_max_allocated_gib"] if peak["device"] == "cuda" else peak["peak_rss_gib"]


# ----- the planner beside each measurement, ratios within the run ----------------------------------------

def setup_for(case: dict, result: dict, device: str):
    """The planner's view of a training case."""
    method = "full" if case["peft"] == "full" else ("qlora" if case["quant"] else "lora")
    trl_docs = case["recipe"] == "trl_docs"
    # mixed lengths: the largest batch the data gives, in token slots (padding included), read from the
    # dataloader before training; fixed lengths: batch x seq
    seq, batch = (result["max_batch_slots"], 1) if case["variable_lengths"] else (result["seq"], result["batch"])
    return TrainingSetup(
        method=method, lora_r=result["rank"], seq_len=seq, batch_size=batch,
        gradient_checkpointing=case["gradient_checkpointing"], fused_loss=case["fused_loss"],
        quant=case["quant"] or "nf4_dq", embeddings_dtype="bf16" if trl_docs or case["embeddings_bf16"] else "fp32",
        norms_dtype="bf16" if trl_docs or case["embeddings_bf16"] else "fp32", device=device,
        # runs saved before the optimizer was recorded used paged_adamw_32bit, the default then
        optim=case.get("optim") or result.get("optim") or "paged_adamw_32bit", checkpoint_mapped=trl_docs,
        full_weights_dtype=case.get("full_weights_dtype", "bf16"))  # saved before the case had it: bf16


def report_model_config(report: dict) -> dict:
    """The measured model's config: saved in the report (a --model run), else the architecture it was built as."""
    return report.get("model_config") or benchmark_architecture(report["arch"], report.get("layers"))


def annotate(report: dict) -> dict:
    """Add to each result: planned peak and the planner's error, peak vs the TRL-docs baseline, step time
    vs bf16 LoRA. Ratios only between results of this one report."""
    cfg = report_model_config(report)
    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    base, lora = rows.get("trl_docs_qlora"), rows.get("lora_bf16")
    for row in rows.values():
        row["peak_gb_measured"] = peak_gib(row)
    for row in rows.values():
        if row["case"]["kind"] == "tokenize":  # the tokenization's own share of the peak: bytes per token
            planned = TOKENIZE_BYTES_PER_TOKEN * row["longest_row_tokens"] / 1024**3
            row["plan"] = {"peak_gib": round(planned, 3)}
            row["planner_error"] = round((planned - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
            continue
        if row["case"]["kind"] != "train":
            row["plan"] = plan_load_memory(cfg, row["case"]["quant"], row["peak"]["device"])
            row["planner_error"] = round((row["plan"]["peak_gib"] - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
            continue
        plan = plan_training_memory(cfg, setup_for(row["case"], row, row["peak"]["device"]))
        row["plan"] = plan
        row["planner_error"] = round((plan["peak_gib"] - row["peak_gb_measured"]) / row["peak_gb_measured"], 4)
        if base:
            row["peak_ratio_vs_trl_docs"] = round(row["peak_gb_measured"] / base["peak_gb_measured"], 3)
        if lora:
            key = "step_cpu_s" if row["peak"]["device"] == "cpu" else "step_s"
            row["step_ratio_vs_lora_bf16"] = round(row[key] / lora[key], 3)
    return report


# ----- tables -------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _phase(row: dict) -> str:
    """Training-phase peak RSS (after a reset of the high-water mark at the start of training) / planned."""
    measured, plan = row.get("train_phase_peak_rss_gib"), row.get("plan", {})
    if measured is None or "train_peak_bytes" not in plan:
        return ""
    return f"{measured:.3f} / {plan['train_peak_bytes'] / GIB:.3f}"


def render_table(report: dict) -> str:
    device = next((r["peak"]["device"] for r in report["results"] if "peak" in r), "cpu")
    measure = "peak RSS GiB" if device == "cpu" else "max allocated GiB"
    layers = f", {report['layers']} layers" if report.get("layers") else ""
    lines = [f"{report['arch']} (random weights{layers}), seq {report['seq']}, LoRA r={report['rank']}, batch {report['batch']}, "
             f"{report['steps']} measured steps after {report['warmup']} warm-up, device {device}",
             "",
             f"| case | what | weights GiB | bits/quantized param | {measure} | planned GiB | planner error | "
             "peak vs TRL docs | training-phase RSS GiB (measured / planned) | step s (wall) | step CPU s | tokens/s "
             "| step vs LoRA bf16 |",
             "|" + "---|" * 13]
    for row in report["results"]:
        case = row["case"]
        if "peak" not in row:
            lines.append(f"| {case['name']} | {case['note']} | {row.get('skipped') or row.get('failed')} |" + " |" * 10)
            continue
        error = row.get("planner_error")
        lines.append("| " + " | ".join([
            case["name"], case["note"], _fmt(row.get("weights_gib")), _fmt(row.get("bits_per_quantized_param"), ".4f"),
            _fmt(row["peak_gb_measured"]), _fmt(row.get("plan", {}).get("peak_gib")),
            "" if error is None else f"{100 * error:+.1f}%", _fmt(row.get("peak_ratio_vs_trl_docs"), ".2f"),
            _phase(row),
            _fmt(row.get("step_s"), ".1f"), _fmt(row.get("step_cpu_s"), ".1f"), _fmt(row.get("tokens_per_s"), ".1f"),
            _fmt(row.get("step_ratio_vs_lora_bf16"), ".2f")]) + " |")
    return "\n".join(lines)


def _ratio(row: dict | None, base: dict | None, key: str) -> float | None:
    if not row or not base or row.get(key) is None or not base.get(key):
        return None
    return row[key] / base[key]


def throughput_goals(report: dict) -> list[str]:
    """The project's default (case qlora) against the TRL-docs recipe and against unsloth, as measured in this
    report: goals >= 1.5x the recipe's tokens/s at no more memory, and within 1.25x of unsloth's tokens/s."""
    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    project, recipe, unsloth = rows.get("qlora"), rows.get("trl_docs_qlora"), rows.get("unsloth_qlora")
    memory = "overall_max_allocated_gib" if project and project["peak"]["device"] == "cuda" else "peak_rss_gib"
    speed = _ratio(project, recipe, "tokens_per_s")
    mem = _ratio(project and project["peak"], recipe and recipe["peak"], memory)
    behind = _ratio(unsloth, project, "tokens_per_s")
    text = lambda value: "n/a" if value is None else f"{value:.2f}x"  # noqa: E731
    return [f"project default (qlora) vs TRL docs recipe: {text(speed)} tokens/s (goal >= 1.50x), "
            f"{text(mem)} {memory} (goal <= 1.00x)",
            f"unsloth vs project default: {text(behind)} tokens/s (goal <= 1.25x)"]


def render_throughput(report: dict) -> str:
    """Speed of every training case: tokens/s, model FLOPs and their utilization of the GPU's bf16 peak,
    memory, and the training loss at the last step."""
    rows = [r for r in report["results"] if r["case"]["kind"] == "train"]
    device = next((r["peak"]["device"] for r in rows if "peak" in r), "cpu")
    name = next((r.get("device_name") for r in rows if r.get("device_name")), None) or "CPU"
    memory = ("max allocated GiB | max reserved GiB" if device == "cuda" else "peak RSS GiB | (CPU: no reserved)")
    base = next((r for r in rows if r["case"]["name"] == "trl_docs_qlora" and "peak" in r), None)
    lines = [f"Throughput on {name}: {report['arch']}, seq {report['seq']}, LoRA r={report['rank']}, "
             f"{report['steps']} measured optimizer steps after {report['warmup']} warm-up",
             "",
             f"| case | what | batch x accum. | tokens/step | step s | tokens/s | vs TRL docs | model TFLOP/s | MFU "
             f"| {memory} | loss at last step |",
             "|" + "---|" * 12]
    for row in rows:
        case = row["case"]
        if "peak" not in row:
            lines.append(f"| {case['name']} | {case['note']} | {row.get('skipped') or row.get('failed')} |" + " |" * 9)
            continue
        peak = row["peak"]
        allocated, reserved = ((peak["overall_max_allocated_gib"], peak["overall_max_reserved_gib"])
                               if device == "cuda" else (peak["peak_rss_gib"], None))
        mfu = row.get("mfu")
        lines.append("| " + " | ".join([
            case["name"], case["note"], f"{row['batch']} x {case.get('accumulation', 1)}", _fmt(row["tokens_per_step"], ".0f"),
            _fmt(row["step_s"], ".3f"), _fmt(row["tokens_per_s"], ".0f"), _fmt(_ratio(row, base, "tokens_per_s"), ".2f"),
            _fmt(row.get("model_tflops_per_s"), ".3g"), "n/a" if mfu is None else f"{100 * mfu:.1f}%",
            _fmt(allocated), _fmt(reserved), _fmt(row.get("final_loss"), ".4f")]) + " |")
    return "\n".join(lines + [""] + throughput_goals(report))


def render_extrapolation(report: dict, archs=("Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B")) -> str:
    """Larger architectures, EXTRAPOLATED (not measured): weights from the measured bytes per parameter of
    each format, training peaks from the planner scaled by its measured/planned ratio on this run's model."""
    rows = {r["case"]["name"]: r for r in report["results"] if "peak" in r}
    measured_arch = parameter_counts(report_model_config(report))
    lines = [f"EXTRAPOLATED from the {report['arch']} measurements above (not measured):", "",
             "| architecture | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for arch in archs:
        counts = parameter_counts(architecture_dimensions(arch))
        cells = []
        for name, row in rows.items():
            if row["case"]["kind"] == "weights":
                bits = row.get("bits_per_quantized_param", 16.0)
                plain = row["weights_gib"] * GIB - measured_arch["linear"] * bits / 8
                per_plain = plain / (measured_arch["embedding"] + measured_arch["lm_head"] + measured_arch["norms"])
                total = counts["linear"] * bits / 8 + per_plain * (counts["embedding"] + counts["lm_head"] + counts["norms"])
                cells.append(f"{total / GIB:.2f}")
            elif "plan" in row:
                scale = row["peak_gb_measured"] / row["plan"]["peak_gib"]
                plan = plan_training_memory(architecture_dimensions(arch), setup_for(row["case"], row, row["peak"]["device"]))
                cells.append(f"{plan['peak_gib'] * scale:.2f}")
            else:
                cells.append("")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tables(report: dict) -> str:
    """The memory table with the planner, the extrapolation to larger architectures (from the named
    architectures only), and the throughput table when training cases ran."""
    parts = [render_table(report)]
    if not report.get("model_config"):
        parts.append(render_extrapolation(report))
    if any(r["case"]["kind"] == "train" for r in report["results"]):
        parts.append(render_throughput(report))
    return "\n\n".join(parts)


# ----- the JSON file ------------------------------------------------------------------------------------

def write_report(path: str | Path, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2))


def read_reports(paths: list[str]) -> dict:
    """Earlier runs' JSON files as one annotated report: the first file's settings, every file's results."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    return annotate({**reports[0], "results": [r for rep in reports for r in rep["results"]]})
