"""Write a post-training-quantized (PTQ) sibling of a 16-bit model directory.

    python tools/quantize.py --model outputs/Qwen3-0.6B-openmath_SFT_LoRa256_QLORA_w4_headbf16 --method GPTQ

The source is a directory written by Fine-tuning/01_Train.py (merged bf16 model + metadata.json) or a
plain Hugging Face model directory. The sibling is written beside it (or under --out-root) with the
source's name and the new quant tag, e.g. ..._SFT_LoRa256_GPTQ_w4g128_headbf16: a model that loads
with AutoModelForCausalLM.from_pretrained, and metadata.json in the training run's schema plus
`source`. It is built in a hidden staging directory and renamed when complete.

Methods: BNB_INT8 and BNB_NF4 (bitsandbytes, data-free, in the main environment); GPTQ and W8A8
(llmcompressor, calibrated). llmcompressor pins an older transformers than the training stack, so it lives
in its own environment, .venv-ptq: run from the main one, this re-runs itself there (creating it first with
scripts/setup_ptq.sh, once, and saying so). QLORA is not a post-training method: it is Fine-tuning/01_Train.py's.
The sibling's metadata.json records its quality against the source (mean KL, max |logit difference|, loss of
both) on held-out rows not used for calibration; its README.md (model card) says the same for people.
The sibling's name is built from sanitized parts only and must lie inside the output root; Python code
shipped with a source model (auto_map) runs only with --trust-remote-code.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

from qlora.core.files import absolute_if_local
from qlora.outputs.publish import library_versions
from qlora.outputs.read import check_finished, check_remote_code, metadata_fields, read_metadata
from qlora.core.files import write_json
from qlora.data.formats import DATASETS, load_rows, to_sft_dataset
from qlora.core.errors import reading_user_file, root_message
from qlora.evaluation import held_out_rows, training_split
from qlora.outputs.loss_plot import write_loss_plot
from qlora.outputs.model_card import base_model_license, write_model_cards
from qlora.model.loading import check_safetensors_weights, save_tokenizer
from qlora.outputs.run_dir import claim, discard_staging
from quantization_utils import (PTQ_METHODS, QuantSpec, build_metadata, build_ptq_plan,
                                short_dtype_name, sibling_dir_name)

# The library each backend's quantizer needs, and how to get it when it is missing.
BACKEND_LIBRARIES = {
    "bitsandbytes": ("bitsandbytes", "pip install -r requirements.txt"),
    "compressed-tensors": ("llmcompressor", "bash scripts/setup_ptq.sh"),
}
# Backends whose library lives in the PTQ environment (.venv-ptq, or the Python named by $PTQ_PYTHON).
PTQ_ENVIRONMENT_BACKENDS = {"compressed-tensors"}
RERUN_MARK = "QUANTIZE_IN_PTQ_ENVIRONMENT"  # set in the environment of the re-run: it must not re-run again
QUALITY_ROWS = 8  # held-out rows the sibling is compared with its source on
QUALITY_MAX_TOKENS = 256  # per row: the source's fp32 logits are kept, rows x tokens x vocabulary x 4 bytes


@dataclass(frozen=True)
class Source:
    dir: Path
    metadata: dict[str, Any] | None  # metadata.json of a 01_Train.py output, None for a plain model dir
    config: Any  # transformers PretrainedConfig
    head_dtype: str  # short dtype name of lm_head in the source checkpoint


def _head_dtype(directory: Path, config, metadata) -> str:
    """The dtype lm_head has on disk: from metadata when the source has it, else the checkpoint's dtype."""
    recorded = ((metadata or {}).get("quantization") or {}).get("lm_head_dtype")
    return short_dtype_name(recorded or str(getattr(config, "dtype", None) or "bfloat16"))


def inspect_source(directory: Path, trust_remote_code: bool = False) -> Source:
    """Check that `directory` holds a 16-bit safetensors model; reads config and metadata only."""
    from transformers import AutoConfig

    if not directory.is_dir():
        raise ValueError(f"model directory {directory} does not exist")
    check_finished(directory)
    check_safetensors_weights(str(directory))
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        has_adapter = (directory / "adapter").is_dir()
        raise ValueError(f"{directory} holds no model (config.json + *.safetensors)"
                         + ("; it is adapter-only: train with merge_after_train=True" if has_adapter else ""))
    metadata = read_metadata(directory)
    check_remote_code(directory, metadata, trust_remote_code)
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        kind = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise ValueError(f"{directory} is already quantized ({kind}); quantize from a 16-bit model directory")
    with metadata_fields(directory):
        return Source(directory, metadata, config, _head_dtype(directory, config, metadata))


def check_group_size(config, group_size: int | None) -> None:
    """Each quantized Linear's input width must be a multiple of the group size."""
    if group_size is None:
        return
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    intermediate = getattr(text, "intermediate_size", text.hidden_size)
    widths = {text.hidden_size, intermediate, text.num_attention_heads * head_dim}
    bad = sorted(w for w in widths if w % group_size)
    if bad:
        raise ValueError(f"group size {group_size} does not divide this model's layer input widths {bad}; "
                         "choose one that divides them all")


def resolve_calibration(args, spec: QuantSpec, source: Source) -> tuple[str, str | None] | None:
    """(registry name, local file or None) of the calibration data, or None for data-free methods."""
    given = args.calibration is not None or args.calibration_path is not None
    if not PTQ_METHODS[spec.method].calibrated:
        if given:
            raise ValueError(f"{spec.method.value} is data-free: drop --calibration/--calibration-path")
        return None
    trained_on = (source.metadata or {}).get("dataset") or {}
    name = args.calibration or trained_on.get("name")
    if name is None:
        raise ValueError(f"{spec.method.value} needs calibration data and {source.dir} has no metadata naming its "
                         f"dataset: pass --calibration ({', '.join(DATASETS)}) and optionally --calibration-path")
    if name not in DATASETS:
        raise ValueError(f"unknown calibration dataset {name!r}; allowed: {', '.join(DATASETS)}")
    path = args.calibration_path
    if path is None and args.calibration is None:  # default: the model's own training data, as it was read
        path = trained_on.get("path")
    return name, absolute_if_local(path)


def calibration_examples(calibration: tuple[str, str | None], samples: int):
    """(raw rows, prompt/completion examples) of the calibration data; a broken local file is one line naming it."""
    name, path = calibration
    with reading_user_file(path, "calibration file") if path else nullcontext():
        rows = load_rows(name, path, samples)
        return rows, to_sft_dataset(rows, name)  # decodes every row: bad bytes show here


def calibration_texts(examples, tokenizer) -> list[str]:
    """Each example as the chat text the model was trained on (prompt + completion)."""
    texts = []
    for example in examples:
        messages = example["prompt"] + example["completion"]
        if tokenizer.chat_template:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append("\n\n".join(m["content"] for m in messages))
    return texts


def check_backend_installed(spec: QuantSpec) -> bool:
    """True when this Python has the method's library; False when the PTQ environment should run it instead;
    a one-line error when neither can."""
    from importlib.util import find_spec

    library, how = BACKEND_LIBRARIES[spec.backend]
    if find_spec(library) is not None:
        return True
    if spec.backend in PTQ_ENVIRONMENT_BACKENDS and not os.environ.get(RERUN_MARK):
        return False
    where = " (the PTQ environment)" if os.environ.get(RERUN_MARK) else ""
    raise ValueError(f"{spec.method.value} needs {library}, which this Python ({sys.executable}){where} lacks: {how}")


def ptq_python() -> Path:
    return Path(os.environ.get("PTQ_PYTHON") or ROOT / ".venv-ptq" / "bin" / "python")


def run_in_ptq_environment(spec: QuantSpec, argv: list[str]) -> None:
    """Run this command again with the PTQ environment's Python, creating .venv-ptq first when it is missing."""
    python = ptq_python()
    library = BACKEND_LIBRARIES[spec.backend][0]
    if not python.is_file():
        if os.environ.get("PTQ_PYTHON"):
            raise SystemExit(f"error: PTQ_PYTHON={python} does not exist")
        print(f"quantize | {spec.method.value} needs {library}, which pins an older transformers than the training "
              f"stack: creating its environment {python.parent.parent} with scripts/setup_ptq.sh (once; a few minutes)",
              flush=True)
        if subprocess.run(["bash", str(ROOT / "scripts" / "setup_ptq.sh")]).returncode != 0:
            raise SystemExit("error: scripts/setup_ptq.sh failed (see above); the PTQ environment is not ready")
    print(f"quantize | {spec.method.value} needs {library}: running in the PTQ environment ({python})", flush=True)
    result = subprocess.run([str(python), str(Path(__file__).resolve()), *argv], env={**os.environ, RERUN_MARK: "1"})
    if result.returncode != 0:
        raise SystemExit(result.returncode)


# ----- quality: the sibling against its 16-bit source, on rows not used for calibration ---------------------


def quality_rows(args, spec: QuantSpec, source: Source, calibration, calibration_rows):
    """(prompt/completion examples, where they come from) for the quality check, or a string saying why there
    are none: the source's held-out training rows minus any calibration row; else, for a calibrated method,
    the rows of the calibration data that follow the calibration rows."""
    if args.quality_rows == 0:
        return "--quality-rows 0"
    try:
        split = training_split(source.metadata)
        rows = held_out_rows(split, None)[0] if split is not None else None
    except (KeyError, TypeError, ValueError, OSError) as err:  # the check is not worth refusing the sibling
        return f"the held-out rows of the source's training run cannot be read back ({root_message(err)})"
    if split is not None:
        used = [dict(row) for row in calibration_rows] if calibration_rows is not None else []
        keep = [i for i, row in enumerate(rows) if dict(row) not in used][:args.quality_rows]
        if not keep:
            return "every held-out row of the source's training split was used for calibration"
        where = f"held-out rows of the source's training split of {split['name']} ({split['path'] or 'hub'})"
        return to_sft_dataset(rows.select(keep), split["name"]), where
    if calibration is None:
        return (f"{source.dir} has no training metadata naming its data and {spec.method.value} is data-free: "
                "quantize a Fine-tuning/01_Train.py output to have it measured")
    name, path = calibration
    with reading_user_file(path, "calibration file") if path else nullcontext():
        rows = load_rows(name, path, args.samples + args.quality_rows)
    if len(rows) <= args.samples:
        return f"the calibration data has no rows beyond the {args.samples} used for calibration"
    where = f"rows {args.samples + 1}-{len(rows)} of {name} ({path or 'hub'}), after the calibration rows"
    return to_sft_dataset(rows.select(range(args.samples, len(rows))), name), where


def measure_quality(source: Source, sibling_dir: Path, examples, where: str, tokenizer, trust_remote_code: bool):
    """The sibling, reloaded from disk, against its source on `examples`: qlora.checks.logits' figures (mean KL,
    max |logit difference|, relative error) and the next-token loss of both, over every token."""
    import torch

    from qlora.checks.logits import logits_on, measure_candidate, sequence_loss
    from qlora.model.loading import load_causal_lm, pick_device

    batches = [dict(tokenizer(text, return_tensors="pt", truncation=True, max_length=QUALITY_MAX_TOKENS))
               for text in calibration_texts(examples, tokenizer)]
    batches = [{key: batch[key] for key in ("input_ids", "attention_mask")} for batch in batches]
    device = pick_device()
    model = load_causal_lm(str(source.dir), None, device, trust_remote_code, dtype=torch.bfloat16)
    reference = logits_on(model, batches)
    del model
    gc.collect()
    model = load_causal_lm(str(sibling_dir), None, device, trust_remote_code, dtype="auto")
    figures = measure_candidate(model.eval(), reference, batches)
    del model
    gc.collect()
    return {"rows": len(batches), "data": where, "max_tokens_per_row": QUALITY_MAX_TOKENS, "device": device,
            "source_loss": sequence_loss(reference, batches), **figures}


def quality_text(quality: dict) -> str:
    if quality.get("skipped"):
        return f"quality not measured: {quality['skipped']}"
    return (f"vs the 16-bit source on {quality['tokens']} held-out tokens: mean KL {quality['mean_kl']:.3g}, "
            f"max |logit diff| {quality['max_abs_logit_diff']:.4g}, loss {quality['loss']:.4f} "
            f"(source {quality['source_loss']:.4f})")


# ----- quantizers: load the source, quantize, save into `out_dir` ------------------------------------------


def quantize_bitsandbytes(source: Source, spec: QuantSpec, bnb_config, texts, args, out_dir: Path):
    """bitsandbytes quantizes while loading; saved right away (no forward pass before saving)."""
    import torch

    from qlora.model.loading import load_causal_lm

    model = load_causal_lm(str(source.dir), bnb_config, trust_remote_code=args.trust_remote_code, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    return model


def quantize_llmcompressor(source: Source, spec: QuantSpec, bnb_config, texts, args, out_dir: Path):
    """llmcompressor `oneshot` on the calibration texts; saved compressed (compressed-tensors format)."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    from qlora.model.loading import load_causal_lm, load_tokenizer

    extras = spec.extras
    if extras["scheme"] == "W8A8":
        recipe = [SmoothQuantModifier(smoothing_strength=extras["smoothing_strength"]),
                  GPTQModifier(targets="Linear", scheme="W8A8", ignore=extras["ignore"])]
    else:
        weights = QuantizationArgs(num_bits=spec.weights_bits, type="int", symmetric=extras["symmetric"],
                                   strategy="group", group_size=extras["group_size"])
        recipe = [GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                               ignore=extras["ignore"])]
    tokenizer = load_tokenizer(str(source.dir), args.trust_remote_code)
    encoded = tokenizer(texts, truncation=True, max_length=args.max_seq_length)
    data = Dataset.from_dict({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    model = load_causal_lm(str(source.dir), device="cpu", trust_remote_code=args.trust_remote_code, dtype=torch.bfloat16)
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=args.max_seq_length,
            num_calibration_samples=len(texts))
    model.save_pretrained(out_dir, save_compressed=True)
    return model


QUANTIZERS = {"bitsandbytes": quantize_bitsandbytes, "compressed-tensors": quantize_llmcompressor}


def saved_format(out_dir: Path) -> str | None:
    """The on-disk format transformers records for the saved quantized checkpoint."""
    quant = json.loads((out_dir / "config.json").read_text()).get("quantization_config") or {}
    return quant.get("format") or quant.get("quant_method")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="source directory: a 01_Train.py output or a 16-bit HF model")
    parser.add_argument("--method", required=True,
                        help=f"post-training method: {', '.join(m.value for m in PTQ_METHODS)}")
    parser.add_argument("--bits", type=int, default=None,
                        help="weight bits (default per method): " + "; ".join(
                            f"{m.value} {'|'.join(map(str, o.bits))}" for m, o in PTQ_METHODS.items()))
    parser.add_argument("--group-size", type=int, default=None,
                        help="weights per quantization group, GPTQ only: 128 (default) | 64 | 32")
    parser.add_argument("--calibration", default=None,
                        help=f"calibration dataset (GPTQ, W8A8): {' | '.join(DATASETS)}; default: the model's "
                             "training dataset from its metadata.json")
    parser.add_argument("--calibration-path", default=None,
                        help="local .jsonl/.json/.parquet/.csv file in the calibration dataset's schema")
    parser.add_argument("--samples", type=int, default=128, help="calibration rows (more: slower, usually better)")
    parser.add_argument("--max-seq-length", type=int, default=512, help="tokens per calibration row (truncated)")
    parser.add_argument("--quality-rows", type=int, default=QUALITY_ROWS,
                        help="held-out rows (not used for calibration) to compare the sibling with its source on; "
                             "0 skips the check")
    parser.add_argument("--out-root", default=None,
                        help="directory to write the sibling into (default: beside --model)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped inside the source directory (auto_map); only for sources you "
                             "trust. Off unless given here: the source's own files never turn it on")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = parse_args(argv)
    try:
        if args.samples < 1:
            raise ValueError(f"--samples={args.samples}: need at least 1")
        if args.quality_rows < 0:
            raise ValueError(f"--quality-rows={args.quality_rows}: need 0 (skip) or more")
        spec, bnb_config = build_ptq_plan(args.method, bits=args.bits, group_size=args.group_size)
        source = inspect_source(Path(args.model), args.trust_remote_code)
        spec = dataclasses.replace(spec, lm_head_dtype=source.head_dtype)
        check_group_size(source.config, spec.extras.get("group_size"))
        out_root = Path(args.out_root) if args.out_root else source.dir.resolve().parent
        with metadata_fields(source.dir):
            calibration = resolve_calibration(args, spec, source)
            final_dir = out_root / sibling_dir_name(source.dir.resolve().name, source.metadata, spec)
        if final_dir.resolve().parent != out_root.resolve():  # the name's parts are sanitized; this is the guarantee
            raise ValueError(f"the sibling's name {final_dir.name!r} would put it outside {out_root}")
        calibration_rows, examples = calibration_examples(calibration, args.samples) if calibration else (None, None)
        if not check_backend_installed(spec):
            run_in_ptq_environment(spec, argv)  # it checks all of the above again, and writes the sibling
            return final_dir
        with metadata_fields(source.dir):
            quality_data = quality_rows(args, spec, source, calibration, calibration_rows)
        run = claim(out_root, final_dir.name, "refuse")  # the name is held until the sibling is published
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    from qlora.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(source.dir), args.trust_remote_code)
    texts = calibration_texts(examples, tokenizer) if calibration else None
    if calibration:
        spec = dataclasses.replace(spec, extras={
            **spec.extras, "calibration": {"dataset": calibration[0], "path": calibration[1], "rows": len(texts),
                                           "max_seq_length": args.max_seq_length}})
    print(f"quantize | {spec.method.value} {source.dir} -> {final_dir}", flush=True)

    with run:
        staging = run.staging  # nothing here looks finished until the final rename
        discard_staging(run)
        staging.mkdir(parents=True)
        try:
            started = time.time()
            model = QUANTIZERS[spec.backend](source, spec, bnb_config, texts, args, staging)
            seconds = time.time() - started
            head = short_dtype_name(str(model.get_output_embeddings().weight.dtype))
            if head != spec.lm_head_dtype:
                raise RuntimeError(f"quantized lm_head is {head}, but the source's is {spec.lm_head_dtype}")
            save_tokenizer(tokenizer, staging)
            del model
            gc.collect()
            spec = dataclasses.replace(spec, extras={**spec.extras, "format": saved_format(staging)})
            weights_bytes = sum(f.stat().st_size for f in staging.glob("*.safetensors"))
            quality = ({"skipped": quality_data} if isinstance(quality_data, str) else
                       measure_quality(source, staging, *quality_data, tokenizer, args.trust_remote_code))
            meta = source.metadata or {}
            metadata = build_metadata(
                spec,
                base_model=meta.get("base_model", str(source.dir.resolve())),
                base_license=meta.get("base_license", base_model_license(str(source.dir))),
                dataset=meta.get("dataset"), peft=meta.get("peft"),
                artifact={"kind": "ptq", "merged": True, "weights_bytes": weights_bytes},
                quantize_seconds=round(seconds, 2),
                quality=quality,
                versions=library_versions(("llmcompressor", "compressed-tensors") if spec.backend == "compressed-tensors" else ()),
                source={"dir": str(source.dir.resolve()), "metadata": source.metadata},
                created_unix=int(time.time()),
            )
            write_json(staging / "metadata.json", metadata)
            write_loss_plot(staging, metadata)  # the source run's training_loss.png, when it has one
            write_model_cards(staging, metadata, final_dir)
            run.mark_staged()
            final_dir = run.publish()
        except BaseException:
            discard_staging(run)
            raise
    print(f"quality  | {quality_text(quality)}", flush=True)
    print(f"done     | {seconds:.1f}s, weights {weights_bytes / 1e6:.2f} MB -> {final_dir}", flush=True)
    return final_dir


if __name__ == "__main__":
    main()
