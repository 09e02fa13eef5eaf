"""Scoring output directories and plain models on a held-out split, side by side (tools/evaluate.py, and the
tools that evaluate what they trained or quantized)."""

from __future__ import annotations

import importlib
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from qlora.checks.scoring import math_answer_correct, perplexity, squad_exact_match, squad_f1
from qlora.core.errors import reading_user_file
from qlora.core.files import absolute_if_local, non_finite_as_null, non_finite_values, read_json_file, write_json
from qlora.core.memory import weight_footprint
from qlora.data.formats import (DATASETS, get_dataset_spec, load_rows, resolve_source, split_rows, squad_answers,
                                to_sft_dataset)
from qlora.model.loading import (check_safetensors_weights, checkpoint_bytes, load_adapter_model, load_causal_lm,
                                 load_tokenizer, pick_device, quiet_bitsandbytes_notices)
from qlora.outputs.loss_plot import pyplot
from qlora.outputs.model_card import write_model_cards
from qlora.outputs.read import (adapter_path, base_load_extras, check_finished, check_remote_code, load_output_dir,
                                metadata_fields, quantization_plan_from_metadata, read_metadata, run_config)
from quantization_utils import QuantMethod, detect_quant_method


# Held-out split used for a dataset no evaluated model was trained on: 01_Train.py's defaults
# (max_train_samples=20000, eval_samples=64, seed=42), i.e. the rows a default training run holds out.
DEFAULT_SPLIT = {"max_rows": 20000 + 64, "eval_rows": 64, "seed": 42}
MAIN_METRIC = {"openmath": "accuracy", "squad": "f1"}
LOAD_LABELS = {"merged": "merged bf16", "adapter": "adapter on {} base", "ptq": "quantized (PTQ)", "base": "base model"}
# What each artifact kind in metadata.json means for loading.
ARTIFACT_LOADERS = {
    "merged_bf16": "merged", "merged_nf4": "merged", "full_bf16": "merged", "ptq": "ptq", "adapter_only": "adapter",
}


@dataclass(frozen=True)
class EvalOptions:
    """What an evaluation asks (tools/evaluate.py's options, with its defaults)."""

    dataset: str | None = None  # None: the dataset the directories were trained on
    dataset_path: str | None = None
    limit: int | None = None  # only the first N held-out rows
    max_new_tokens: int = 256
    batch_size: int = 16
    chart: str = "eval_comparison.png"
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoadKind:
    """How one directory is loaded: `kind` is merged | adapter | ptq | base."""

    kind: str
    method: str  # quantization method of the training run or PTQ (metadata, else name, else NONE)
    base_model: str | None = None  # adapter kind: the model the adapter was trained on
    quant_options: tuple = ()  # adapter kind: extras of the quantization plan, as (name, value) pairs


def detect_load_kind(path: Path, metadata: dict | None) -> LoadKind:
    """What a directory holds and how to load it, from its metadata (or name); reads no weights."""
    path = Path(path)
    check_finished(path)
    if metadata is None:
        method = detect_quant_method(path.name)
        if method is QuantMethod.QLORA and not (path / "config.json").is_file():
            raise ValueError(f"{path} looks like a QLoRA adapter (name) but has no metadata.json naming its base model")
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is neither an output directory (metadata.json) nor a model (config.json)")
        return LoadKind("merged" if method else "base", (method or QuantMethod.NONE).value)
    quant = metadata.get("quantization") or {}
    method = str(quant.get("method", "NONE"))
    artifact = (metadata.get("artifact") or {}).get("kind")
    if artifact not in ARTIFACT_LOADERS:
        raise ValueError(f"{path}/metadata.json has artifact kind {artifact!r}; known: {', '.join(ARTIFACT_LOADERS)}")
    kind = ARTIFACT_LOADERS[artifact]
    if (metadata.get("artifact") or {}).get("primary") == "adapter":  # a flagged merge: the adapter is the model
        kind = "adapter"
    if kind == "adapter":  # the options are qlora.outputs.read.quantization_plan_from_metadata's, which loads it
        return LoadKind("adapter", method, metadata["base_model"], tuple(sorted(base_load_extras(metadata).items())))
    return LoadKind(kind, method)  # merged: bf16 on disk whatever the training method


def check_loadable(path: Path, metadata: dict | None, load: LoadKind, trust_remote_code: bool) -> None:
    """What loading would refuse, found before any model loads: remote code not asked for, pickle weights."""
    check_remote_code(path, metadata, trust_remote_code)
    weights_dir = load.base_model if load.kind == "adapter" else path
    if load.kind == "adapter" and Path(weights_dir).is_dir():
        check_remote_code(weights_dir, None, trust_remote_code)
    check_safetensors_weights(str(weights_dir))


def load_for_eval(path, device=None, trust_remote_code: bool = False):
    """(model, tokenizer, metadata) for any directory kind, model in eval mode: training outputs through
    qlora.outputs.read.load_output_dir (the primary artifact their metadata names), PTQ siblings and plain
    models through their own config.json."""
    import torch

    path = Path(path)
    metadata = read_metadata(path)
    load = detect_load_kind(path, metadata)
    if load.kind in ("adapter", "merged") and metadata is not None:
        model, tokenizer, metadata = load_output_dir(path, device, trust_remote_code)
        return model.eval(), tokenizer, metadata
    check_remote_code(path, metadata, trust_remote_code)
    # base: bf16 safetensors; ptq: the quantization_config in config.json decides the format
    model = load_causal_lm(str(path), None, device or pick_device(), trust_remote_code,
                           dtype=torch.bfloat16 if load.kind != "ptq" else "auto")
    return model.eval(), load_tokenizer(str(path), trust_remote_code), metadata


# ----- which rows ---------------------------------------------------------------------------------

def training_split(metadata: dict | None) -> dict | None:
    """The dataset and held-out split a directory's training run used, or None (not trained here)."""
    if not metadata or not metadata.get("dataset"):
        return None
    config = run_config(metadata)
    if not config:
        return None
    data = metadata["dataset"]
    return {"name": data["name"], "path": data.get("path"), "max_rows": config["max_train_samples"] + config["eval_samples"],
            "eval_rows": data["eval_rows"], "seed": data["split_seed"]}


def choose_splits(metadatas: list, dataset: str | None, dataset_path: str | None) -> list[dict]:
    """One held-out split per directory: its own training split when it was trained on the dataset
    evaluated; else the first such split among the directories (so base and fine-tuned are scored on
    the same rows); else DEFAULT_SPLIT of the dataset given."""
    splits = [training_split(m) for m in metadatas]
    if dataset is None:
        known = [s for s in splits if s is not None]
        if not known:
            raise ValueError("no directory has training metadata (metadata.json); pass --dataset (and --dataset-path)")
        dataset, dataset_path = known[0]["name"], known[0]["path"]
    matches = [s for s in splits if s and s["name"] == dataset and _same_path(s["path"], dataset_path)]
    fallback = matches[0] if matches else {"name": dataset, "path": dataset_path, **DEFAULT_SPLIT}
    return [s if s in matches else fallback for s in splits]


def _same_path(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and Path(a).resolve() == Path(b).resolve())


def held_out_rows(split: dict, limit: int | None):
    """(raw rows, prompt/completion examples) of a split's held-out part, split as the training run split it
    (data.formats.split_rows); a broken local file is one line."""
    with reading_user_file(split["path"], "dataset file") if split["path"] else nullcontext():
        rows = load_rows(split["name"], split["path"], split["max_rows"])
        _, held_out = split_rows(rows, split["eval_rows"], split["seed"])
        if len(held_out) == 0:
            raise ValueError(f"the held-out split of {split['name']} is empty (eval_rows={split['eval_rows']})")
        held_out = held_out.select(range(min(limit, len(held_out)))) if limit else held_out
        return held_out, to_sft_dataset(held_out, split["name"])  # decodes every row: bad bytes show here


# ----- measuring ----------------------------------------------------------------------------------

def completion_loss(model, tokenizer, examples) -> float:
    """Mean cross-entropy (nats/token) of the reference completions given their prompts."""
    import torch

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for example in examples:
            prompt = tokenizer.apply_chat_template(example["prompt"], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
            prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]], device=device)
            labels = ids.clone()
            labels[:, :prompt_len] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.float().item() * n
            tokens += n
    return total / max(tokens, 1)


def generate(model, tokenizer, prompts, max_new_tokens: int, batch_size: int):
    """Greedy completions of chat prompts; returns (texts, generated tokens, seconds)."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    texts, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), batch_size):
        chats = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[start:start + batch_size]]
        batch = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        started = time.time()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        seconds += time.time() - started
        for row in out[:, batch["input_ids"].shape[1]:]:
            ids = row.tolist()
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in ids else ids
            ids = [i for i in ids if i != tokenizer.pad_token_id]
            new_tokens += len(ids)
            texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts, new_tokens, seconds


def score(dataset: str, predictions: list[str], rows) -> dict:
    """The dataset's answer metrics; none for a format without reference answers (messages, prompt_completion)."""
    if get_dataset_spec(dataset).reference_column is None:
        return {}
    if dataset == "openmath":
        correct = [math_answer_correct(p, r) for p, r in zip(predictions, rows["expected_answer"])]
        return {"accuracy": 100 * sum(correct) / len(correct)}
    refs = [squad_answers(row) for row in rows]
    return {"exact_match": 100 * sum(squad_exact_match(p, r) for p, r in zip(predictions, refs)) / len(refs),
            "f1": 100 * sum(squad_f1(p, r) for p, r in zip(predictions, refs)) / len(refs)}


def evaluate_dir(path: Path, split: dict, rows, examples, options: EvalOptions) -> dict:
    """Load one directory, score it on its held-out rows, write its eval_results.json (and model card)."""
    load = detect_load_kind(path, read_metadata(path))
    started = time.time()
    model, tokenizer, metadata = load_for_eval(path, trust_remote_code=options.trust_remote_code)
    load_seconds = time.time() - started
    print(f"evaluate | {path.name}: {load.kind} ({load.method}) loaded in {load_seconds:.1f}s; "
          f"{len(rows)} held-out {split['name']} rows", flush=True)
    loss = completion_loss(model, tokenizer, examples)
    predictions, new_tokens, gen_seconds = generate(model, tokenizer, list(examples["prompt"]),
                                                    options.max_new_tokens, options.batch_size)
    footprint = weight_footprint(model)
    quality = (metadata or {}).get("quality") or {}
    result = {
        "directory": str(path), "load_kind": load.kind, "method": load.method, "peft": (metadata or {}).get("peft"),
        "artifact": (metadata or {}).get("artifact", {}).get("kind", "base_model"),
        "dataset": {**{k: split[k] for k in ("name", "max_rows", "eval_rows", "seed")},
                    "path": absolute_if_local(split["path"])}, "rows": len(rows),
        **score(split["name"], predictions, rows),
        "heldout_loss": loss, "perplexity": perplexity(loss),
        "weights_bytes": footprint["total_bytes"], "weight_footprint": footprint,
        # a compressed-tensors sibling (GPTQ, W8A8) is decompressed to 16 bits on load: its files say what it saves
        "weights_on_disk_bytes": checkpoint_bytes(path) if load.kind != "adapter" else None,
        "load_seconds": round(load_seconds, 3), "generated_tokens": new_tokens,
        "tokens_per_second": new_tokens / gen_seconds if gen_seconds else None,
        "device": str(next(model.parameters()).device), "max_new_tokens": options.max_new_tokens,
        "examples": [{"prompt": e["prompt"][-1]["content"], "prediction": p} for e, p in zip(examples, predictions)][:5],
        **({"quality_vs_source": {k: quality.get(k) for k in ("mean_kl", "max_abs_logit_diff", "loss", "source_loss",
                                                              "tokens")}} if "mean_kl" in quality else {}),
    }
    non_finite = non_finite_values(result)  # e.g. a perplexity that overflows: null on disk, listed by name
    write_json(path / "eval_results.json", {**non_finite_as_null(result), **({"non_finite": non_finite} if non_finite else {})})
    if metadata is not None:  # an output directory of this project: its card shows the results
        write_model_cards(path, metadata)
    metric = MAIN_METRIC.get(split["name"])
    print(f"evaluate | {path.name}: " + (f"{metric} {result[metric]:.1f}, " if metric else "") +
          f"held-out loss {loss:.4f}, {result['tokens_per_second'] or 0:.1f} tokens/s", flush=True)
    return result


# ----- reporting ----------------------------------------------------------------------------------

def markdown_table(results: list[dict]) -> str:
    metrics = [m for m in ("accuracy", "exact_match", "f1") if any(m in r for r in results)]
    quality = any("quality_vs_source" in r for r in results)  # PTQ siblings: measured by tools/quantize.py
    header = ["model", "method", "peft", "loaded as", *metrics, "held-out loss", "perplexity", "in memory MB", "on disk MB",
              "load s",
              "tokens/s", "rows", *(["KL vs 16-bit source"] if quality else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        loaded = LOAD_LABELS[r["load_kind"]].format("4-bit" if r["method"] == "QLORA" else "bf16")
        cells = [Path(r["directory"]).name, r["method"], r["peft"] or "-", loaded,
                 *[f"{r[m]:.1f}" if m in r else "" for m in metrics],
                 f"{r['heldout_loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['weights_bytes'] / 1e6:.2f}",
                 f"{r['weights_on_disk_bytes'] / 1e6:.2f}" if r.get("weights_on_disk_bytes") else "-",
                 f"{r['load_seconds']:.2f}", f"{r['tokens_per_second']:.1f}" if r["tokens_per_second"] else "n/a",
                 str(r["rows"]),
                 *([f"{r['quality_vs_source']['mean_kl']:.3g}" if "quality_vs_source" in r else "-"] if quality else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(results: list[dict], path: Path) -> None:
    plt = pyplot()
    metric = MAIN_METRIC[results[0]["dataset"]["name"]]
    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.25 * len(results)))
    markers = "osD^vP*X"
    for i, r in enumerate(results):  # a legend, not labels on the points: equal-size models overlap
        ax.scatter(r["weights_bytes"] / 1e6, r[metric], s=60, marker=markers[i % len(markers)], alpha=0.8,
                   label=f"{Path(r['directory']).name} ({r[metric]:.1f})")
    ax.set_ylim(-5, 105)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=1, frameon=False)
    ax.set_xlabel("weight footprint (MB, quantization state included)")
    ax.set_ylabel(f"held-out {metric} (%)")
    ax.set_title(f"{results[0]['dataset']['name']}: {metric} vs weight footprint")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- the whole evaluation -------------------------------------------------------------------------

def check_options(options: EvalOptions) -> None:
    if options.limit is not None and options.limit <= 0:
        raise ValueError(f"--limit must be a positive integer, got {options.limit}")
    if options.max_new_tokens <= 0 or options.batch_size <= 0:
        raise ValueError("--max-new-tokens and --batch-size must be positive integers")
    if options.dataset_path is not None:
        if options.dataset is None:
            raise ValueError(f"--dataset-path needs --dataset to say its format ({', '.join(DATASETS)})")
        resolve_source(options.dataset, options.dataset_path)


def read_held_out(paths: list[Path], options: EvalOptions) -> tuple[list[dict], dict]:
    """(the split of each directory, the held-out rows of each split): every directory understood, and every
    split read and its rows decoded, before any model loads. A ValueError says what is wrong."""
    for path in paths:
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory")
    for path in paths:
        check_finished(path)
    metadatas = [read_metadata(p) for p in paths]
    for path, metadata in zip(paths, metadatas):
        with metadata_fields(path):
            check_loadable(path, metadata, detect_load_kind(path, metadata), options.trust_remote_code)
    with metadata_fields(*paths):
        splits = choose_splits(metadatas, options.dataset, options.dataset_path)
    if splits[0]["name"] == "text":
        raise ValueError("the text format has no prompts to answer: evaluate on a messages, prompt_completion, "
                         "openmath or squad dataset (--dataset, --dataset-path)")
    held_out = {}
    for split in splits:
        key = tuple(sorted(split.items()))
        if key not in held_out:
            held_out[key] = held_out_rows(split, options.limit)
    return splits, held_out


def import_model_stack() -> None:
    """peft and transformers' model classes, imported before any load is timed: the first model's load time
    is then not imports."""
    quiet_bitsandbytes_notices()  # peft imports bitsandbytes
    importlib.import_module("peft")
    importlib.import_module("transformers").AutoModelForCausalLM  # transformers loads its classes on first use


def evaluate_dirs(dirs: list, options: EvalOptions = EvalOptions()) -> list[dict]:
    """Evaluate every directory (one eval_results.json each), print the markdown table, and chart the main
    metric when several directories share a dataset that has one. Bad input exits with one `error:` line
    before any model loads: every caller is a command line."""
    paths = [Path(d) for d in dirs]
    try:
        check_options(options)
        splits, held_out = read_held_out(paths, options)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    import_model_stack()
    results = [evaluate_dir(path, split, *held_out[tuple(sorted(split.items()))], options)
               for path, split in zip(paths, splits)]
    print()
    print(markdown_table(results))
    names = {r["dataset"]["name"] for r in results}
    if len(results) > 1 and len(names) == 1 and names <= set(MAIN_METRIC):  # a chart of the answer metric
        write_chart(results, Path(options.chart))
        print(f"\nchart: {options.chart}")
    return results


# ----- one adapter on the bases a client may put it on --------------------------------------------------

KL_ROWS = 16  # held-out rows (prompt and reference completion) the KL to the trained model is taken over

def adapter_loaders(path: Path, metadata: dict, device: str) -> dict:
    """name -> loader of each way a client loads a run's adapter (and its merged model, when it has one): the
    trained model (the adapter on its 4-bit base by the run's plan), the adapter by AutoPeftModelForCausalLM with
    defaults (on the base adapter_config.json names: the shared base once tools/shared_base.py passed), and the
    adapter on the original 16-bit base."""
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel

    adapter = adapter_path(path, metadata)
    _, bnb_config = quantization_plan_from_metadata(metadata)
    loaders = {"trained (adapter on its 4-bit base)": lambda: load_adapter_model(
        metadata["base_model"], adapter, bnb_config, device)}
    if (metadata.get("artifact") or {}).get("kind") in ("merged_bf16", "merged_nf4"):
        loaders["merged"] = lambda: load_causal_lm(str(path), None, device, dtype="auto")
    named = Path(str(read_json_file(adapter / "adapter_config.json").get("base_model_name_or_path"))).name
    loaders[f"PEFT defaults (base: {named})"] = lambda: AutoPeftModelForCausalLM.from_pretrained(
        str(adapter), dtype=torch.bfloat16, device_map={"": device})
    loaders["adapter on the original 16-bit base"] = lambda: PeftModel.from_pretrained(
        load_causal_lm(metadata["base_model"], None, device), str(adapter))
    return loaders


def _log_probs(model, tokenizer, texts: list[str]) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [torch.log_softmax(model(**tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device))
                                  .logits.float().cpu(), -1) for text in texts]


def compare_adapter_bases(path: Path, rows: int, max_new_tokens: int = 64, batch_size: int = 16,
                          device: str | None = None) -> list[dict]:
    """A run's adapter (and merged model) loaded each way `adapter_loaders` lists, scored on the run's held-out
    rows, with each one's mean KL(trained || it) per token over KL_ROWS rows (prompt and reference completion)."""
    import gc

    metadata = read_metadata(path)
    split = training_split(metadata)
    raw, examples = held_out_rows(split, rows)
    tokenizer = load_tokenizer(str(path))
    texts = [tokenizer.apply_chat_template(e["prompt"] + e["completion"], tokenize=False)
             for e in examples.select(range(min(KL_ROWS, len(examples))))]
    reference, results = None, []
    for name, load in adapter_loaders(path, metadata, device or pick_device()).items():
        model = load().eval()
        log_probs = _log_probs(model, tokenizer, texts)
        reference = reference or log_probs  # the first loader is the trained model
        kl = sum(float((r.exp() * (r - q)).sum()) for r, q in zip(reference, log_probs)) / sum(r.shape[1] for r in reference)
        predictions, _, _ = generate(model, tokenizer, list(examples["prompt"]), max_new_tokens, batch_size)
        results.append({"loaded as": name, **score(split["name"], predictions, raw), "mean_kl_vs_trained": kl,
                        "rows": len(raw), "kl_tokens": sum(r.shape[1] for r in reference)})
        del model
        gc.collect()
    return results
