"""The shared base: the 4-bit base an adapter was trained on, written once as a plain bf16 model.

A QLoRA adapter learned to correct dequant(NF4(W)), not the base's 16-bit W; on the 16-bit base (what PEFT with
defaults and vLLM's LoRA load) it computes another function. The shared base holds dequant(NF4(W)) for every
quantized layer and the base's other tensors in bf16: loaded by plain transformers (no bitsandbytes), it is the
function the adapter was trained on. One is written per base model and quantization plan, under
`OUTPUT_ROOT/shared-bases/`, and every run on that base reuses it. Each adapter is checked on it against the
trained model (the adapter on its 4-bit base) as the merge check measures a merge, and names it in
`adapter_config.json` only when it passes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from qlora.checks.logits import (FINGERPRINT_TOKENS, MERGE_CHECK_ROWS, kl_limit, measure_saved, tokenize_for_check,
                                 trained_reference)
from qlora.core.errors import UserError
from qlora.core.files import (absolute_if_local, check_free_disk, disk_full_is_a_user_error, fsync_path,
                              read_json_file, write_json)
from qlora.core.heap import freed_blocks_leave_the_heap
from qlora.core.memory import format_size
from qlora.core.shards import SHARD_BYTES, write_checkpoint
from qlora.merge.weights import free_wrapped_model, merged_config, merged_layout, streams_merge
from qlora.model.base_weights import MERGE_BASE_WEIGHTS
from qlora.model.loading import (load_adapter_model, load_causal_lm, load_merged_dir, load_tokenizer,
                                 safetensors_files)
from qlora.outputs.model_card import CARD_FILE, shared_base_card
from qlora.outputs.read import adapter_path, quantization_plan_from_metadata, run_config
from qlora.outputs.run_dir import apply_umask
from quantization_utils import base_model_name

SHARED_BASES = "shared-bases"  # the folder under OUTPUT_ROOT that holds them
KEY_FILE = "shared_base.json"  # in each shared base: what it was written from
# the quantization options that decide dequant(NF4(W)); compute and storage dtypes do not change the values
DEQUANTIZATION_OPTIONS = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "llm_int8_skip_modules")
# texts the check falls back on when the run's held-out rows cannot be read (a hub dataset offline, a moved file)
FALLBACK_TEXTS = ("The quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
                  "Question: What is the capital of France?\nAnswer: Paris",
                  "def add(a, b):\n    return a + b\n")


def weights_identity(model_name: str) -> list[list]:
    """What names the base's weights as they are on disk: each safetensors file's name, the name it resolves to (a
    hub cache blob is named by its content hash), its size and modification time. A base replaced in place gets
    another identity, so another shared base."""
    identity = []
    for file in safetensors_files(model_name):
        path = Path(file)
        stat = path.stat()
        identity.append([path.name, path.resolve().name, stat.st_size, stat.st_mtime_ns])
    return identity


def shared_base_key(metadata: dict, bnb_config) -> dict[str, Any]:
    """What a shared base for this run must have been written from: the base model, its weight files, and the
    quantization options (the run's `bnb_config`) that decide the dequantized values."""
    if bnb_config is None or not getattr(bnb_config, "load_in_4bit", False):
        raise UserError("this run's base was not loaded in 4-bit: its adapter serves exactly on the base model "
                        "itself, no shared base is needed")
    options = bnb_config.to_dict()
    base = metadata["base_model"]
    return {"base_model": base, "weights": weights_identity(base),
            "quantization": {name: options.get(name) for name in DEQUANTIZATION_OPTIONS}}


def shared_base_dir(root: Path, key: dict[str, Any]) -> Path:
    """`root/shared-bases/NAME-nf4[-dq]-bf16-HASH`: readable, and distinct for every key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    quant = key["quantization"]
    tag = f"{quant['bnb_4bit_quant_type']}{'-dq' if quant['bnb_4bit_use_double_quant'] else ''}-bf16"
    return Path(root) / SHARED_BASES / f"{base_model_name(key['base_model'])}-{tag}-{digest}"


def check_existing(directory: Path, key: dict[str, Any]) -> bool:
    """Whether `directory` is a finished shared base written from `key`; False when it does not exist. A directory
    there that is not one (no key file, another key: a stranger's, or edited) is one line, never used."""
    if not directory.exists():
        return False
    key_file = directory / KEY_FILE
    if not key_file.is_file():
        raise UserError(f"{directory} exists but is not a shared base this project wrote (no {KEY_FILE}); move it away")
    recorded = read_json_file(key_file, ": it was cut short or edited; remove the directory to rewrite it")
    if not isinstance(recorded, dict) or recorded.get("key") != json.loads(json.dumps(key)):
        raise UserError(f"{directory} was written from another base or plan than this run's ({key_file} differs); "
                        "move it away")
    return True


def publish_once(staged: Path, directory: Path) -> bool:
    """Rename a finished `staged` directory to `directory`; when another writer got there first, `staged` is removed
    and theirs kept (a rename onto a non-empty directory fails, so two runs at once never mix files). Returns
    whether this one was published."""
    try:
        os.rename(staged, directory)
        return True
    except OSError:
        if not directory.is_dir():
            raise
        shutil.rmtree(staged, ignore_errors=True)
        return False


def write_shared_base(key: dict[str, Any], bnb_config, directory: Path, device: str, trust_remote_code: bool,
                      report: Callable[[str], None] = print) -> bool:
    """Load the base as training loaded it (4-bit, by the run's plan), and write its dequantized weights as a bf16
    checkpoint into `directory`, one tensor at a time (memory holds the 4-bit model and one layer), with its
    config (no quantization), generation config, tokenizer and KEY_FILE. Written beside `directory` and renamed in
    when finished. Returns whether this call published it (False: another run did meanwhile)."""
    import torch
    from tqdm.auto import tqdm

    base = key["base_model"]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        model = load_causal_lm(base, bnb_config, device, trust_remote_code, dtype=torch.bfloat16)
        if not streams_merge(model):
            raise UserError(f"transformers renames {model.config.model_type} weights on load; a shared base is "
                            "written only for families saved under the names they are loaded by")
        specs = merged_layout(model, MERGE_BASE_WEIGHTS["dequantized"], None, torch.bfloat16)
        needed = sum(spec.nbytes for spec in specs)
        check_free_disk(directory.parent, needed, "the shared base")
        report(f"writing {len(specs)} tensors of {base} dequantized to bf16 ({format_size(needed)}) into {directory}")
        with (torch.no_grad(), freed_blocks_leave_the_heap(), disk_full_is_a_user_error(needed, directory.parent),
              tqdm(total=len(specs), desc="dequantizing", unit="tensor", leave=False) as bar):
            write_checkpoint(staged, specs, SHARD_BYTES, on_tensor=lambda _: bar.update())
        merged_config(model, torch.bfloat16).save_pretrained(staged)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staged)
        del model, specs
        gc.collect()
        load_tokenizer(base, trust_remote_code).save_pretrained(staged)
        write_json(staged / KEY_FILE, {"key": key, "dtype": "bf16", "created_unix": int(time.time()),
                                       "written_with": _versions()})
        (staged / CARD_FILE).write_text(shared_base_card(key, str(directory.resolve())), encoding="utf-8")
        for path in [*staged.rglob("*"), staged]:  # on disk before the rename makes it visible
            fsync_path(path)
        apply_umask(staged)  # shared: readable by whoever the umask lets read the runs
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    published = publish_once(staged, directory)
    fsync_path(directory.parent)
    return published


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "bitsandbytes")}


def check_batches(run_dir: Path, metadata: dict, tokenizer, held_out: Callable[[dict, int], Any]) -> tuple[list, str]:
    """The rows the check compares logits on: the run's first held-out rows as the trainer tokenized them, or
    FALLBACK_TEXTS when those cannot be read. Returns (batches, what they are)."""
    import torch

    config = run_config(metadata)
    try:
        _, examples = held_out(metadata, MERGE_CHECK_ROWS)
        return tokenize_for_check(tokenizer, examples, config.get("max_seq_length", 512)), f"{len(examples)} held-out rows"
    except (UserError, ValueError, OSError, KeyError, TypeError) as err:
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                   for ids in (torch.tensor([tokenizer(text)["input_ids"]]) for text in FALLBACK_TEXTS)]
        return batches, f"{len(FALLBACK_TEXTS)} fixed texts (held-out rows unreadable: {str(err)[:120]})"


def check_adapter_on(directory: Path, run_dir: Path, metadata: dict, bnb_config, batches: list, device: str,
                     trust_remote_code: bool) -> dict[str, Any]:
    """The run's adapter loaded by PEFT on the shared base in `directory` (plain transformers, PEFT's defaults),
    measured against the trained model (the adapter on its 4-bit base by `bnb_config`, the run's plan) as the merge
    check measures a merge: max |logit diff|, mean KL(trained || on shared base), against the same limit."""
    from peft import PeftModel

    adapter_dir = adapter_path(run_dir, metadata)
    trained = load_adapter_model(metadata["base_model"], adapter_dir, bnb_config, device, trust_remote_code)
    spill = Path(tempfile.mkdtemp(prefix=".check-", dir=directory.parent))
    try:
        reference, trained_loss, floor = trained_reference(trained, batches, spill)
        free_wrapped_model(trained)
        del trained
        reload = lambda path: PeftModel.from_pretrained(  # noqa: E731
            load_merged_dir(path, None, device, trust_remote_code), str(adapter_dir)).eval()
        figures, fingerprint, _ = measure_saved(directory, reload, reference, batches,
                                                batches[0]["input_ids"][0, :FINGERPRINT_TOKENS].tolist())
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    limit = kl_limit(floor, run_config(metadata).get("merge_check_max_kl", 5e-3))
    return {**figures, "trained_loss": trained_loss, "rounding_floor_kl": floor, "kl_limit": limit,
            "passed": figures["mean_kl"] <= limit, "fingerprint": fingerprint}


def name_base_in_adapter(adapter_dir: Path, base: str | Path) -> None:
    """adapter_config.json's base_model_name_or_path set to `base` (what AutoPeftModelForCausalLM loads)."""
    config_file = adapter_dir / "adapter_config.json"
    config = read_json_file(config_file)
    config["base_model_name_or_path"] = absolute_if_local(str(base))
    write_json(config_file, config)


def serve_on_shared_base(run_dir: Path, metadata: dict, root: Path, device: str, trust_remote_code: bool,
                         held_out: Callable[[dict, int], Any], report: Callable[[str], None] = print) -> dict[str, Any]:
    """Find or write the shared base of a finished run's adapter (under `root`), check the adapter on it, and, when
    it passes, name it in the adapter's adapter_config.json. Returns metadata.json's `shared_base` record."""
    _, bnb_config = quantization_plan_from_metadata(metadata)  # the plan the run trained with
    key = shared_base_key(metadata, bnb_config)
    directory = shared_base_dir(root, key)
    started = time.time()
    if check_existing(directory, key):
        report(f"reusing {directory}")
        written = False
    else:
        written = write_shared_base(key, bnb_config, directory, device, trust_remote_code, report)
        if not written:
            report(f"another run wrote {directory} meanwhile: using it")
        check_existing(directory, key)
    batches, rows = check_batches(run_dir, metadata, load_tokenizer(str(run_dir), trust_remote_code), held_out)
    report(f"checking the adapter on it with PEFT's defaults against the trained model on {rows}")
    figures = check_adapter_on(directory, run_dir, metadata, bnb_config, batches, device, trust_remote_code)
    adapter_dir = adapter_path(run_dir, metadata)
    if figures["passed"]:
        name_base_in_adapter(adapter_dir, directory)
    return {"path": str(directory.resolve()), "written_now": written, "check_rows": rows,
            "named_in_adapter_config": figures["passed"], "seconds": round(time.time() - started, 2), **figures}
