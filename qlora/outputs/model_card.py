"""Model cards: README.md with Hugging Face front matter in every output directory (and in its adapter/),
rendered from metadata.json alone, plus eval_results.json once tools/evaluate.py has run.

Fine-tuning/01_Train.py writes the cards into its staging directory before publishing; tools/quantize.py
into a sibling's; tools/evaluate.py and tools/export_gguf.py render them again after adding results. The
cards say, for people, what metadata.json says: how the model was trained, what was checked, how each
artifact loads (the adapter with the exact BitsAndBytesConfig of the base it was trained on).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlora.data.formats import DATASETS
from qlora.outputs.read import quantization_plan_from_metadata, read_metadata
from qlora.train.adapter import BASE_QUANTIZATION_FILE


CARD_FILE = "README.md"
EVAL_FILE = "eval_results.json"
GENERATION_SAMPLES_SHOWN = 2
SAMPLE_CHARS = 400


# ----- facts read from the metadata -----------------------------------------------------------------------

def hub_id(name: str | None) -> str | None:
    """`name` when it names a Hugging Face Hub repo: metadata records a local model or data file as an absolute
    path, so anything else (owner/name) is a hub id."""
    if not name or os.path.isabs(str(name)) or str(name).startswith("."):
        return None
    return str(name)


def dataset_hub_id(metadata: dict) -> str | None:
    """The hub id of the training data: the registry's dataset when no local file was given, else the path
    when it is a hub id."""

    dataset = metadata.get("dataset") or {}
    if dataset.get("path"):
        return hub_id(dataset["path"])
    spec = DATASETS.get(dataset.get("name"))
    return getattr(spec, "hub_id", None)


def base_model_license(model_name: str | None) -> str | None:
    """The `license` of the base model's own card (README.md front matter): a local directory's, or a hub repo's
    already in the local cache (nothing is downloaded for it); None when no card says one."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if not model_name:
        return None
    local = Path(model_name) / CARD_FILE
    card_file = local if local.is_file() else (try_to_load_from_cache(model_name, CARD_FILE) if hub_id(model_name) else None)
    if not isinstance(card_file, (str, Path)) or not Path(card_file).is_file():
        return None
    try:
        license_name = ModelCard.load(card_file).data.license
    except Exception:  # a stranger's card that does not parse: the license is unknown, the run goes on
        return None
    return license_name if isinstance(license_name, str) and license_name else None


def bnb_arguments(metadata: dict) -> dict[str, Any] | None:
    """The BitsAndBytesConfig arguments that differ from the defaults, of the 4-bit base the run trained on
    (rebuilt from the metadata's quantization block by the same builder the run used); None for a 16-bit base."""

    if (metadata.get("quantization") or {}).get("method") != "QLORA":
        return None
    _, bnb_config = quantization_plan_from_metadata(metadata)
    return {key: value for key, value in bnb_config.to_diff_dict().items()
            if not key.startswith("_") and key != "quant_method"}


def bnb_code(arguments: dict[str, Any]) -> str:
    """`BitsAndBytesConfig(...)` as Python source: dtype names become torch dtypes."""
    dtype_keys = {"bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"}
    arguments = dict(sorted(arguments.items(), key=lambda item: not item[0].startswith("load_in")))
    parts = [f"{key}=torch.{value}" if key in dtype_keys else f"{key}={value!r}" for key, value in arguments.items()]
    return "BitsAndBytesConfig(\n    " + ",\n    ".join(parts) + ",\n)"


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows if value is not None]
    return "\n".join(lines)


# ----- sections ---------------------------------------------------------------------------------------------

def front_matter(metadata: dict, library: str, relation: str | None, tags: list[str]) -> str:
    from huggingface_hub import ModelCardData

    base = hub_id(metadata.get("base_model"))
    dataset = dataset_hub_id(metadata)
    data = ModelCardData(base_model=base, base_model_relation=relation if base else None, library_name=library,
                         pipeline_tag="text-generation", tags=tags, datasets=[dataset] if dataset else None,
                         license=metadata.get("base_license"))
    return f"---\n{data.to_yaml()}\n---\n"


def training_tags(metadata: dict) -> list[str]:
    config = metadata.get("config") or {}
    method = (metadata.get("quantization") or {}).get("method")
    peft = config.get("PEFT_CONFIG")
    tags = {"QLORA": ["qlora", "bitsandbytes", "4-bit"]}.get(method, [])
    tags += {"LoRa": ["lora"], "DoRa": ["dora"], "Full": ["full-fine-tuning"]}.get(peft, [])
    return tags + ["sft", "trl"]


def base_plan_text(metadata: dict) -> str:
    quant = metadata.get("quantization") or {}
    extras = quant.get("extras") or {}
    if quant.get("method") == "QLORA":
        storage = f", {extras['quant_storage']} storage" if extras.get("quant_storage") else ""
        return (f"4-bit {str(extras.get('base_quant_type', 'nf4')).upper()}"
                f"{', double quantization' if extras.get('double_quant') else ''}, "
                f"{extras.get('compute_dtype', 'bfloat16')} compute{storage} (bitsandbytes), frozen")
    config = metadata.get("config") or {}
    if config.get("PEFT_CONFIG") != "Full":
        return "bf16 (no quantization), frozen"
    if config.get("full_weights_dtype") == "fp32":
        return "fp32 master weights, bf16 compute (no quantization); saved in bf16"
    return "bf16 (no quantization)"


def training_section(metadata: dict, heading: str = "## How it was trained") -> str:
    config = metadata.get("config") or {}
    training = metadata.get("training") or {}
    dataset = metadata.get("dataset") or {}
    params = metadata.get("parameters") or {}
    peft = config.get("PEFT_CONFIG")
    adapter = None
    if peft in ("LoRa", "DoRa"):
        options = metadata.get("peft_options") or {}
        scaling = (f", scale {fmt(options['scaling'])} ({'rsLoRA: alpha / sqrt(r)' if options.get('use_rslora') else 'alpha / r'})"
                   if "scaling" in options else "")
        init = f", init {options['init_lora_weights']}" if options.get("init_lora_weights") else ""
        adapter = (f"{'DoRA' if peft == 'DoRa' else 'LoRA'} r={config.get('lora_r')}, alpha={config.get('lora_alpha')}"
                   f"{scaling}{init}, dropout {config.get('lora_dropout')}, on {', '.join(config.get('target_modules') or [])}")
    elif peft == "Full":
        adapter = "none: every weight trained (full fine-tuning)"
    source = dataset.get("path") or dataset_hub_id(metadata)
    data = (f"{dataset.get('name')} ({source}): {dataset.get('train_rows')} training rows, "
            f"{dataset.get('eval_rows')} held-out rows (split seed {dataset.get('split_seed')})") if dataset else None
    batch = config.get("per_device_train_batch_size")
    accumulation = config.get("gradient_accumulation_steps")
    world = training.get("world_size") or 1
    steps = (f"{training.get('steps')} optimizer steps of {batch} x {accumulation} x {world} device(s) sequences, "
             f"learning rate {config.get('learning_rate')}, {config.get('optim')}, "
             f"up to {config.get('max_seq_length')} tokens per sequence") if training else None
    losses = (f"train {fmt(training.get('train_loss'))} (mean over the run), held-out {fmt(training.get('eval_loss'))} "
              "after the last step (nats per completion token)") if training else None
    trainable = (f"{params['trainable']:,} of {params['total']:,} ({params.get('trainable_percent')}%)"
                 if params.get("trainable") else None)
    peak = (metadata.get("peak_memory") or {})
    memory = None
    if peak:
        gpu = peak.get("overall_max_allocated_gib")
        memory = (f"{fmt(gpu, 3)} GiB GPU allocated, " if gpu else "") + f"{fmt(peak.get('peak_rss_gib'), 3)} GiB RSS"
    versions = ", ".join(f"{name} {version}" for name, version in (metadata.get("versions") or {}).items())
    rows = [("base model", f"`{metadata.get('base_model')}`"), ("base weights during training", base_plan_text(metadata)),
            ("adapter", adapter), ("trainable parameters", trainable), ("data", data), ("steps", steps),
            ("loss", losses), ("training time", f"{training.get('train_seconds')} s" if training else None),
            ("peak memory", memory), ("libraries", versions or None)]
    return f"{heading}\n\n{table(rows)}\n\n![training and held-out loss](training_loss.png)\n"


def merge_section(metadata: dict) -> str | None:
    check = metadata.get("merge_check")
    if not check:
        return None
    verdict = ("passed" if check.get("passed") else
               "**FAILED: the merged weights differ from the trained model; use `adapter/` (the primary artifact)**")
    lines = ["## Merge check", "",
             f"The merged weights were compared with the trained model (the adapter on the base it was trained on) "
             f"on {check.get('tokens')} held-out tokens: mean KL {fmt(check.get('mean_kl'), 3)}, "
             f"max |logit difference| {fmt(check.get('max_abs_logit_diff'))}, threshold mean KL <= "
             f"{fmt(check.get('kl_limit', check.get('max_kl')), 3)} (the larger of merge_check_max_kl and the bf16 "
             f"rounding floor {fmt(check.get('rounding_floor_kl'), 3)}): {verdict}. Kept: the `{check.get('chosen_base')}` merge"
             f"{' re-quantized to NF4' if check.get('artifact_candidate') == 'nf4' else ''}.", ""]
    candidates = check.get("candidates") or {}
    if candidates:
        lines += ["| candidate | mean KL | max abs logit diff | loss over every token of the check rows |", "|---|---|---|---|"]
        lines += [f"| {name} | {fmt(c.get('mean_kl'), 3)} | {fmt(c.get('max_abs_logit_diff'))} | {fmt(c.get('loss'))} |"
                  for name, c in candidates.items()]
        lines += ["", f"The trained model's loss on the same tokens: {fmt(check.get('trained_loss'))} (prompt tokens "
                  "included, so not comparable with the held-out loss per completion token above)."
                  + (" `original` is the adapter added to the 16-bit weights of the base: what a client that loads "
                     "the adapter on the 16-bit base computes." if "original" in candidates else "")]
    return "\n".join(lines) + "\n"


def generation_section(metadata: dict) -> str | None:
    check = metadata.get("generation_check")
    if not check:
        return None
    rate = check.get("stop_rate")
    lines = ["## Generation check", "",
             f"Greedy generation on {check.get('prompts')} held-out prompts: "
             f"{'n/a' if rate is None else f'{100 * rate:.0f}'}% ended with an "
             f"end-of-sequence token within {check.get('max_new_tokens')} new tokens; "
             f"{fmt(check.get('mean_new_tokens'), 3)} new tokens on average."]
    for sample in (check.get("samples") or [])[:GENERATION_SAMPLES_SHOWN]:
        lines += ["", "Prompt:", "", "```text", str(sample.get("prompt", ""))[:SAMPLE_CHARS], "```", "Output:", "",
                  "```text", str(sample.get("output", ""))[:SAMPLE_CHARS], "```"]
    return "\n".join(lines) + "\n"


def evaluation_section(results: dict | None) -> str | None:
    if not results:
        return None
    metric_names = {"accuracy": "accuracy (%)", "exact_match": "exact match (%)", "f1": "F1 (%)",
                    "heldout_loss": "held-out loss (nats per completion token)", "perplexity": "perplexity",
                    "weights_bytes": "weights in memory (bytes)", "weights_on_disk_bytes": "weight files (bytes)",
                    "tokens_per_second": "generation tokens/s", "load_seconds": "load time (s)"}
    dataset = results.get("dataset") or {}
    rows = [(label, fmt(results[key])) for key, label in metric_names.items() if results.get(key) is not None]
    return ("## Evaluation\n\n"
            f"tools/evaluate.py on {results.get('rows')} held-out rows of {dataset.get('name')} "
            f"({dataset.get('path') or 'hub'}, split seed {dataset.get('seed')}), loaded as {results.get('load_kind')} "
            f"on {results.get('device')}, greedy, up to {results.get('max_new_tokens')} new tokens:\n\n"
            f"{table(rows, ('metric', 'value'))}\n")


def quality_section(metadata: dict) -> str | None:
    quality = metadata.get("quality")
    if not quality:
        return None
    if quality.get("skipped"):
        return f"## Quality against the 16-bit source\n\nNot measured: {quality['skipped']}.\n"
    rows = [("mean per-token KL divergence from the source", fmt(quality.get("mean_kl"), 3)),
            ("max abs logit difference", fmt(quality.get("max_abs_logit_diff"))),
            ("relative logit error", fmt(quality.get("relative_error"), 3)),
            ("loss of the 16-bit source", fmt(quality.get("source_loss"))),
            ("loss of this model", fmt(quality.get("loss")))]
    return ("## Quality against the 16-bit source\n\n"
            f"Measured on {quality.get('tokens')} tokens of {quality.get('rows')} rows not used for calibration "
            f"({quality.get('data')}), both models reloaded from disk; loss is next-token cross-entropy over "
            "every token:\n\n" + table(rows, ("figure", "value")) + "\n")


def exports_section(metadata: dict) -> str | None:
    exports = metadata.get("exports") or []
    if not exports:
        return None
    lines = ["## Exports", "", "| file | format | type | architecture | tensors | bytes |", "|---|---|---|---|---|---|"]
    lines += [f"| `{e.get('file')}` | {e.get('format')} | {e.get('outtype')} | {e.get('architecture')} | "
              f"{e.get('tensors')} | {e.get('bytes')} |" for e in exports]
    lines += ["", f"Made with llama.cpp's `convert_hf_to_gguf.py` ({exports[-1].get('converter')}); run it with "
              f"llama.cpp: `llama-cli -m {exports[-1].get('file')}`."]
    return "\n".join(lines) + "\n"


# ----- loading instructions -----------------------------------------------------------------------------------

def adapter_loading(metadata: dict, adapter_path: str) -> str:
    """How to load the adapter on the base it was trained on (the 4-bit one, with its exact config)."""

    base = metadata.get("base_model")
    arguments = bnb_arguments(metadata)
    if arguments is None:
        return ("```python\nimport torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f"base = AutoModelForCausalLM.from_pretrained({base!r}, dtype=torch.bfloat16)\n"
                f"model = PeftModel.from_pretrained(base, {adapter_path!r})\n```\n\n"
                "The adapter was trained on the bf16 base; `AutoPeftModelForCausalLM.from_pretrained"
                f"({adapter_path!r})` loads the same.\n")
    return (f"The adapter was trained on the **4-bit {arguments.get('bnb_4bit_quant_type', 'nf4').upper()} "
            "quantization** of the base, not on its 16-bit weights. Load the base with this BitsAndBytesConfig "
            f"(also in `{BASE_QUANTIZATION_FILE}` beside the adapter: `BitsAndBytesConfig.from_dict(json.load(...))`):\n\n"
            "```python\nimport torch\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
            f"BitsAndBytesConfig\n\nbnb_config = {bnb_code(arguments)}\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r}, quantization_config=bnb_config, dtype=torch.bfloat16)\n"
            f"model = PeftModel.from_pretrained(base, {adapter_path!r})\n"
            + ("" if shared_base_passed(metadata) else  # else the config names the shared base
               "# or: AutoPeftModelForCausalLM.from_pretrained(adapter_path, quantization_config=bnb_config, "
               "dtype=torch.bfloat16)\n")
            + "```\n\n" + shared_base_loading(metadata, adapter_path))


def shared_base_passed(metadata: dict) -> bool:
    """tools/shared_base.py checked the adapter on the shared base and adapter_config.json names it."""
    return bool((metadata.get("shared_base") or {}).get("passed"))


def shared_base_loading(metadata: dict, adapter_path: str) -> str:
    """Serving the adapter without bitsandbytes: on the shared bf16 base (tools/shared_base.py), once checked."""
    shared = metadata.get("shared_base") or {}
    if not shared.get("passed"):
        return ("A client that loads the adapter with defaults (`AutoPeftModelForCausalLM` without "
                "`quantization_config`, lm-eval's `peft=`, vLLM's LoRA) puts it on the 16-bit weights, which it was "
                "not trained on. To serve it without bitsandbytes, use the merged model, which was checked against the "
                "trained one, or write the shared bf16 base of its 4-bit weights: `python tools/shared_base.py "
                "DIR`.\n")
    return ("Without bitsandbytes: `adapter_config.json` names the **shared base** "
            f"`{shared['path']}`, the base's NF4 weights dequantized and saved in bf16, which is what the adapter was "
            "trained on. PEFT with its defaults loads it:\n\n"
            "```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            f"model = AutoPeftModelForCausalLM.from_pretrained({adapter_path!r})\n```\n\n"
            f"Checked on {shared.get('check_rows')} against the trained model: mean KL {fmt(shared.get('mean_kl'), 3)}, "
            f"max |logit diff| {fmt(shared.get('max_abs_logit_diff'))} (limit {fmt(shared.get('kl_limit'), 3)}). "
            "A LoRA server takes the same pair: the shared base as the model, this directory as the adapter "
            f"(vLLM: `vllm serve {shared['path']} --enable-lora --lora-modules tuned={adapter_path}`, with "
            "`--max-lora-rank` at least the adapter's rank when it is above vLLM's default of 16).\n")


def merged_loading(metadata: dict, path: str) -> str:
    kind = (metadata.get("artifact") or {}).get("kind")
    needs = ("It is stored re-quantized to NF4 with bitsandbytes, which loading needs."
             if kind == "merged_nf4" else "Plain bf16 safetensors: transformers alone loads it, no bitsandbytes.")
    return (f"{needs}\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})\n```\n")


def ptq_loading(metadata: dict, path: str) -> str:
    backend = (metadata.get("quantization") or {}).get("backend")
    needs = {"bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors"}.get(backend, backend)
    return (f"Loading needs {needs} installed (transformers reads the format from config.json).\n\n"
            f"```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained({path!r})\n```\n")


def moved_note(metadata: dict, path: str, with_base: bool) -> str:
    """What to change in the code above once the directory is copied elsewhere."""
    base = str(metadata.get("base_model") or "")
    local_base = with_base and base and hub_id(base) is None
    return (f"The paths above are where this directory was written, so the code runs as it is from any folder of "
            f"that machine. Copied elsewhere, replace `{path}` with its new path"
            + (f", and `{base}` with the base model's" if local_base else "")
            + (" (`adapter/adapter_config.json` names the shared base: copy it too, and give its new path there)."
               if with_base and shared_base_passed(metadata) else
               " (`adapter/adapter_config.json` names it too)." if local_base else ".") + "\n")


def project_loading(path: str) -> str:
    return (f"With this project: `python tools/chat.py {path}` talks to it (the chat template and the stop rule it was "
            f"trained and checked with; `--prompt TEXT` for one answer), `python tools/evaluate.py {path}` scores it, and "
            "`qlora.outputs.read.load_output_dir(path)` loads whatever metadata.json names as the primary artifact.\n")


# ----- the cards --------------------------------------------------------------------------------------------

def join(*sections: str | None) -> str:
    return "\n".join(section for section in sections if section).rstrip() + "\n"


def training_card(metadata: dict, name: str, results: dict | None, path: str) -> str:
    """README.md of a 01_Train.py output directory published at `path` (absolute)."""
    artifact = metadata.get("artifact") or {}
    kind = artifact.get("kind")
    has_adapter = bool(artifact.get("adapter_dir"))
    adapter_path = f"{path}/{artifact.get('adapter_dir') or 'adapter'}"
    what = {"merged_bf16": "the merged model (bf16)", "merged_nf4": "the merged model, re-quantized to NF4",
            "full_bf16": "the fully fine-tuned model (bf16)", "adapter_only": "the adapter only"}.get(kind, kind)
    lines = [f"# {name}", "",
             f"`{metadata.get('base_model')}` fine-tuned with "
             f"{'QLoRA' if (metadata.get('quantization') or {}).get('method') == 'QLORA' else metadata.get('peft')} "
             f"on {(metadata.get('dataset') or {}).get('name')} by this project's Fine-tuning/01_Train.py. "
             f"This directory holds {what}" + (" and `adapter/`, the trained adapter." if has_adapter and kind != "adapter_only" else ".")]
    if artifact.get("primary") == "adapter" and kind != "adapter_only":
        lines += ["", "> **The merge check flagged the merged weights: the adapter (`adapter/`, on the base it was "
                  "trained on) is the primary artifact.**"]
    loading = ["## How to load", ""]
    if kind in ("merged_bf16", "merged_nf4", "full_bf16"):
        loading += ["### The merged model", "", merged_loading(metadata, path)]
    if has_adapter:
        loading += ["### The adapter", "", adapter_loading(metadata, adapter_path)]
    loading += [project_loading(path), moved_note(metadata, path, has_adapter)]
    tags = training_tags(metadata) + (["merged"] if kind in ("merged_bf16", "merged_nf4") else [])
    library = "peft" if kind == "adapter_only" else "transformers"
    relation = "adapter" if kind == "adapter_only" else "finetune"
    return join(front_matter(metadata, library, relation, tags), "\n".join(lines) + "\n", training_section(metadata),
                merge_section(metadata), generation_section(metadata), evaluation_section(results),
                exports_section(metadata), "\n".join(loading))


def adapter_card(metadata: dict, name: str, results: dict | None, path: str) -> str:
    """README.md of adapter/ inside a 01_Train.py output directory published at `path` (absolute)."""
    base = metadata.get("base_model")
    adapter_path = f"{path}/{(metadata.get('artifact') or {}).get('adapter_dir') or 'adapter'}"
    tags = ["peft"] + training_tags(metadata) + ([f"base_model:adapter:{hub_id(base)}"] if hub_id(base) else [])
    intro = (f"# {name}: adapter\n\nThe {metadata.get('peft')} adapter trained by this project's Fine-tuning/01_Train.py "
             f"on `{base}` (base weights: {base_plan_text(metadata)}). The merged model, if the run wrote one, is in "
             "the directory above.\n")
    adapter_results = results if results and results.get("load_kind") == "adapter" else None
    return join(front_matter(metadata, "peft", "adapter", tags), intro,
                "## How to load\n\n" + adapter_loading(metadata, adapter_path) + "\n" + moved_note(metadata, path, True),
                training_section(metadata).replace("(training_loss.png)", "(../training_loss.png)"),
                merge_section(metadata), evaluation_section(adapter_results))


def ptq_card(metadata: dict, name: str, results: dict | None, path: str) -> str:
    """README.md of a tools/quantize.py sibling published at `path` (absolute)."""
    quant = metadata.get("quantization") or {}
    extras = quant.get("extras") or {}
    source = metadata.get("source") or {}
    source_meta = source.get("metadata") or {}
    detail = ", ".join(f"{key} {value}" for key, value in extras.items() if key not in ("calibration",))
    calibration = extras.get("calibration")
    calibrated = (f" Calibrated on {calibration.get('rows')} rows of {calibration.get('dataset')} "
                  f"({calibration.get('path') or 'hub'}), up to {calibration.get('max_seq_length')} tokens each."
                  if calibration else " Data-free: no calibration.")
    intro = (f"# {name}\n\n{quant.get('method')} post-training quantization ({quant.get('weights_bits')}-bit weights, "
             f"lm_head {quant.get('lm_head_dtype')}; {detail}) of `{source.get('dir')}`, written by this project's "
             f"tools/quantize.py in {metadata.get('quantize_seconds')} s.{calibrated}\n")
    tags = {"BNB_INT8": ["bitsandbytes", "8-bit"], "BNB_NF4": ["bitsandbytes", "4-bit", "nf4"],
            "GPTQ": ["gptq", "compressed-tensors", f"{quant.get('weights_bits')}-bit"],
            "W8A8": ["w8a8", "compressed-tensors", "8-bit"]}.get(quant.get("method"), [])
    trained = training_section(source_meta, "## How the source was trained") if source_meta.get("training") else None
    # how the source was trained, not what loading this sibling needs: its own format decides that
    source_tags = [tag for tag in training_tags(source_meta) if tag not in ("bitsandbytes", "4-bit", "8-bit")
                   and tag not in tags] if source_meta.get("training") else []
    return join(front_matter(metadata, "transformers", "finetune" if source_meta.get("training") else "quantized",
                             tags + source_tags),
                intro, quality_section(metadata), evaluation_section(results), trained, exports_section(metadata),
                "## How to load\n\n" + ptq_loading(metadata, path) + "\n" + project_loading(path) + "\n"
                + moved_note(metadata, path, False))


def shared_base_card(key: dict, path: str) -> str:
    """README.md of a shared base (tools/shared_base.py) published at `path` (absolute)."""
    base, quant = key["base_model"], key["quantization"]
    plan = f"{str(quant.get('bnb_4bit_quant_type')).upper()}{', double quantization' if quant.get('bnb_4bit_use_double_quant') else ''}"
    intro = (f"# {Path(path).name}\n\n`{base}` as this project's QLoRA runs train on it: its weights quantized by "
             f"bitsandbytes ({plan}) and dequantized, saved in bf16. A plain transformers model (no bitsandbytes "
             "needed); the adapters trained on the 4-bit base compute on it what they computed in training. Written "
             f"once by tools/shared_base.py and shared by every run on this base and plan; `shared_base.json` records "
             "what it was written from.\n")
    loading = ("## How to load\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
               f"base = AutoModelForCausalLM.from_pretrained({path!r}, dtype=\"auto\")\n"
               "model = PeftModel.from_pretrained(base, \"RUN_DIR/adapter\")  # an adapter trained on this base\n```\n")
    return join(front_matter({"base_model": base}, "transformers", "quantized", ["bitsandbytes-dequantized", "nf4"]),
                intro, loading)


def read_eval_results(directory: Path) -> dict | None:
    file = Path(directory) / EVAL_FILE
    if not file.is_file():
        return None
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # the card is rendered without them; evaluate rewrites the file
    return results if isinstance(results, dict) else None


def write_model_cards(directory: str | Path, metadata: dict | None = None, final: str | Path | None = None) -> list[Path]:
    """Render README.md into `directory` (and adapter/README.md when it has an adapter) from its metadata
    (`metadata`, or its metadata.json) and its eval_results.json. `final` is where the directory is published
    (default: where it is); the cards' code names it by its absolute path. Returns the files written."""

    directory = Path(directory)
    metadata = metadata if metadata is not None else read_metadata(directory)
    if metadata is None:
        return []
    final = Path(final or directory).resolve()
    name, path = final.name, str(final)
    results = read_eval_results(directory)
    written = []
    if (metadata.get("artifact") or {}).get("kind") == "ptq":
        card = ptq_card(metadata, name, results, path)
    else:
        card = training_card(metadata, name, results, path)
        adapter_dir = directory / ((metadata.get("artifact") or {}).get("adapter_dir") or "adapter")
        if (metadata.get("artifact") or {}).get("adapter_dir") and (adapter_dir / "adapter_config.json").is_file():
            (adapter_dir / CARD_FILE).write_text(adapter_card(metadata, name, results, path), encoding="utf-8")
            written.append(adapter_dir / CARD_FILE)
    (directory / CARD_FILE).write_text(card, encoding="utf-8")
    return [directory / CARD_FILE, *written]
