"""QLoRA supervised fine-tuning of a causal LM, end to end, in one script.

Edit the constants below, or override any of them on the command line as --NAME=value, then run
    python Fine-tuning/01_Train.py
Flow: config -> validate -> plan -> data -> model -> train -> save -> merge -> metadata.
The output is one tagged directory under OUTPUT_ROOT (see docs/QLoRA.md).
"""

import gc
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config_utils import ConfigError, apply_overrides, validate_config  # noqa: E402
from dist_utils import check_launch, launch_context, resolve_quant_storage  # noqa: E402
from data_utils import get_dataset_spec, load_rows, split_rows, to_sft_dataset  # noqa: E402
from memory_planner import format_plan, plan_for_train_config  # noqa: E402
from model_loading import pick_device  # noqa: E402
from quantization_utils import QuantMethod, build_metadata, build_quantization_plan, output_dir_name, peft_tag  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Configuration: every name here can be overridden as --NAME=value
_names_before_config = set(globals())
# -- model and data
MODEL_NAME = "Qwen/Qwen3-0.6B"  # hub id or local directory (safetensors weights)
DATASET_CHOICE = "openmath"  # openmath | squad
DATASET_PATH = None  # None = the hub dataset; else a local .jsonl/.json/.parquet/.csv in DATASET_CHOICE's schema
max_train_samples = 20000  # rows read from the dataset (hub datasets are streamed, so only these download)
eval_samples = 64  # held-out rows (same seed -> same split): eval loss and the merge check
trust_remote_code = False  # True runs Python code shipped with the model repo: only for repos you trust
# -- quantization
QUANT_METHOD = "QLORA"  # QLORA (4-bit NF4 + double quant base, bf16 compute) | NONE (bf16 base)
# -- adapters
PEFT_CONFIG = "LoRa"  # LoRa | DoRa | Full (full fine-tuning); QLORA always uses LoRa
lora_r = 256  # rank: higher = more trainable params and memory (Qwen3-0.6B, 7 projections: r=64 ~40M, r=256 ~161M)
lora_alpha = 16  # LoRA scale is lora_alpha / lora_r
lora_dropout = 0.05  # dropout on the adapter input, [0, 1)
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # names or globs
# -- training
per_device_train_batch_size = 1  # sequences per step per device; memory grows with it
gradient_accumulation_steps = 16  # effective batch = batch size * this
gradient_checkpointing = True  # recompute activations in backward: less activation memory, slower steps
learning_rate = 2e-4  # AdamW peak learning rate (linear decay)
num_train_epochs = 1.0  # used when max_steps is -1
max_steps = -1  # > 0 stops after this many optimizer steps; -1 = run num_train_epochs
max_seq_length = 1024  # tokens per example; longer ones are truncated
optim = "paged_adamw_8bit"  # paged_adamw_8bit (2 B/param of state) | paged_adamw_32bit (8 B) | adamw_torch | adamw_bnb_8bit | adafactor
bnb_4bit_quant_storage = "auto"  # auto (bfloat16 under FSDP, else uint8) | uint8 | bfloat16 | float16 | float32
logging_steps = 10  # log the loss every this many optimizer steps
save_steps = 50  # resumable checkpoint every this many steps: fewer = less work lost to a crash, more disk writes
keep_checkpoints = 2  # newest checkpoints kept while training (>= 1); each costs disk (the log prints the estimate)
RESUME = "auto"  # auto (continue an interrupted run from its newest complete checkpoint) | never | a checkpoint dir
seed = 42  # data split, adapter init and shuffling
# -- output
OUTPUT_ROOT = "outputs"  # the tagged directory is created under it
if_output_exists = "refuse"  # refuse | suffix (write NAME-2, NAME-3, ... beside the existing one)
merge_after_train = True  # True: merged bf16 model + adapter/; False: adapter only (research mode)
merge_base = "dequantized"  # dequantized (the NF4 weights it was trained on) | original (16-bit base) | auto (both checked, closer kept)
merged_precision = "bf16"  # bf16 (plain transformers, no bitsandbytes) | nf4 (re-quantized: smaller, further from trained)
keep_lm_head_fp16 = False  # True: save lm_head in fp16 (untied from the embedding); needs merge_after_train
merge_check_max_kl = 5e-3  # mean KL(trained || merged) per token above which the merge is flagged (docs: why 5e-3)
# ----------------------------------------------------------------------------------------------------

CONFIG_NAMES = [name for name in globals() if name not in _names_before_config and name != "_names_before_config"]
OPTIONAL_TYPES = {"DATASET_PATH": str}

log = logging.getLogger("train")


def step(name: str, message: str, *args) -> None:
    log.info(f"{name:<9}| {message}", *args)


def resolve_output_dir(root: Path, name: str, policy: str) -> Path:
    """The final directory for this run; never an existing one."""
    final = root / name
    if not final.exists():
        return final
    if policy == "refuse":  # validate_config has already refused any policy but refuse | suffix
        raise ConfigError(f"output directory {final} exists; remove it or set --if_output_exists=suffix")
    n = 2
    while (root / f"{name}-{n}").exists():
        n += 1
    return root / f"{name}-{n}"


def check_model_source(cfg: dict) -> dict:
    """The model path/config exists and the sequence length fits it; reads config.json only, no weights.
    Returns the (text) model config as a dict, for the memory planner."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(cfg["MODEL_NAME"], trust_remote_code=cfg["trust_remote_code"])
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"MODEL_NAME={cfg['MODEL_NAME']!r} cannot be loaded: {first_line}") from None
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if context is not None and cfg["max_seq_length"] > context:
        raise ConfigError(f"max_seq_length={cfg['max_seq_length']} exceeds the model's context of {context} tokens")
    return model_config.get_text_config().to_dict()


def tokenize_for_check(tokenizer, examples, max_length: int):
    """Held-out prompt+completion pairs as single-sequence batches for the merge check."""
    batches = []
    for example in examples:
        text = tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)
        encoded = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def library_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in
            ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")}


def main(argv=None) -> Path | None:
    launch = launch_context()  # torchrun / accelerate launch: one process per device; rank 0 logs and writes
    logging.basicConfig(level=logging.INFO if launch.is_main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    started = time.time()

    # ---- config -------------------------------------------------------------------------------------
    try:
        cfg = apply_overrides({name: globals()[name] for name in CONFIG_NAMES},
                              sys.argv[1:] if argv is None else list(argv), OPTIONAL_TYPES)
        # ---- validate -------------------------------------------------------------------------------
        validate_config(cfg)
        method = QuantMethod.parse(cfg["QUANT_METHOD"])
        if method is QuantMethod.QLORA and cfg["PEFT_CONFIG"] != "LoRa":
            step("config", "QLORA trains LoRA adapters: PEFT_CONFIG=%s overridden to LoRa", cfg["PEFT_CONFIG"])
            cfg["PEFT_CONFIG"] = "LoRa"
        if cfg["DATASET_PATH"] is not None:
            from data_utils import check_local_file

            check_local_file(cfg["DATASET_PATH"])
        model_config = check_model_source(cfg)
        import torch

        check_launch(launch, cfg, torch.cuda.is_available())
        # ---- plan -----------------------------------------------------------------------------------
        head_dtype = "fp16" if cfg["keep_lm_head_fp16"] else "bf16"
        spec, bnb_config = build_quantization_plan(
            method, lm_head_dtype=head_dtype, lora_r=cfg["lora_r"], merge_after_train=cfg["merge_after_train"],
            quant_storage=resolve_quant_storage(cfg["bnb_4bit_quant_storage"], launch.fsdp))
        peft_name = peft_tag(cfg["PEFT_CONFIG"], cfg["lora_r"])
        root = Path(cfg["OUTPUT_ROOT"])
        final_dir = resolve_output_dir(root, output_dir_name(cfg["MODEL_NAME"], cfg["DATASET_CHOICE"], peft_name, spec),
                                       cfg["if_output_exists"])
        step("config", "%s", json.dumps(cfg))
        step("plan", "%s %s -> %s", method.value, peft_name, final_dir)
        memory_plan = plan_for_train_config(model_config, cfg, pick_device())
        step("plan", "%s", format_plan(memory_plan))
        from checkpoint_utils import plan_resume

        staging = root / f".{final_dir.name}.partial"  # nothing here looks finished until the final rename
        resume = plan_resume(cfg["RESUME"], staging / "checkpoints", cfg)
        for path, problem in resume.skipped:
            step("resume", "WARNING: skipping checkpoint %s: %s", path, problem)
        # ---- data -----------------------------------------------------------------------------------
        rows = load_rows(cfg["DATASET_CHOICE"], cfg["DATASET_PATH"], cfg["max_train_samples"] + cfg["eval_samples"])
        train_rows, eval_rows = split_rows(rows, cfg["eval_samples"], cfg["seed"])
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    train_data, eval_data = to_sft_dataset(train_rows, cfg["DATASET_CHOICE"]), to_sft_dataset(eval_rows, cfg["DATASET_CHOICE"])
    step("data", "%s: %d train / %d held-out rows from %s", cfg["DATASET_CHOICE"], len(train_data), len(eval_data),
         cfg["DATASET_PATH"] or get_dataset_spec(cfg["DATASET_CHOICE"]).hub_id)

    # ---- model --------------------------------------------------------------------------------------
    from accelerate import PartialState
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from checkpoint_utils import MarkCompleteCallback, StopOnSignalCallback, keep_trainable_dtypes, restore_finished
    from memory_planner import check_free_disk, disk_needed
    from dist_utils import combine_peak_reports, gather
    from heap import release_free_heap
    from memory_planner import with_measured_peak, with_merge_check
    from memory_usage import GIB, count_parameters, peak_memory_report, weight_footprint
    from merge_utils import FINGERPRINT_TOKENS, logits_fingerprint, merge_and_check
    from artifacts import load_adapter_model, load_merged_dir
    from model_loading import load_causal_lm, load_tokenizer, prepare_kbit_model
    from training_setup import check_target_modules, target_modules_regex

    set_seed(cfg["seed"])
    state = PartialState()  # joins the process group of a distributed launch; a no-op for a single process
    device = state.device.type if not launch.distributed else str(state.device)
    if launch.distributed:
        step("model", "%s launch: %d processes, one per %s", "FSDP" if launch.fsdp else "DDP", launch.world_size,
             state.device.type)
    if device == "cpu":
        step("model", "no CUDA device: running on CPU (bitsandbytes NF4 CPU kernels; paged optimizers run unpaged)")
    else:
        torch.cuda.reset_peak_memory_stats()
    tokenizer = load_tokenizer(cfg["MODEL_NAME"], cfg["trust_remote_code"])
    model = load_causal_lm(cfg["MODEL_NAME"], bnb_config, device, cfg["trust_remote_code"], for_fsdp=launch.fsdp)
    footprint = weight_footprint(model)
    step("model", "%s loaded on %s: weights %.1f MB (bf16 would be %.1f MB, %.1f%% less)", cfg["MODEL_NAME"], device,
         footprint["total_bytes"] / 1e6, footprint["bf16_bytes"] / 1e6,
         100 * (1 - footprint["total_bytes"] / footprint["bf16_bytes"]))
    if bnb_config is not None and not launch.fsdp:  # its fp32 upcasts would mix dtypes inside FSDP's flat shards
        model = prepare_kbit_model(model, cfg["gradient_checkpointing"])  # frozen embedding/head stay bf16
    if cfg["PEFT_CONFIG"] != "Full":
        try:
            check_target_modules(model, cfg["target_modules"])
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                          target_modules=target_modules_regex(cfg["target_modules"]), task_type="CAUSAL_LM",
                          use_dora=cfg["PEFT_CONFIG"] == "DoRa")
        model = get_peft_model(model, lora)
    trainable, total = count_parameters(model)
    step("model", "trainable params %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    merged_params = (total + model.get_output_embeddings().weight.numel() * cfg["keep_lm_head_fp16"]
                     if cfg["merge_after_train"] or cfg["PEFT_CONFIG"] == "Full" else 0)
    disk = disk_needed(sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad), trainable,
                       cfg["optim"], cfg["keep_checkpoints"], merged_params)
    try:
        check_free_disk(root, disk["total"], f"{cfg['keep_checkpoints'] + 1} checkpoints and the outputs")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    step("disk", "~%.3f GIB per checkpoint, ~%.3f GIB merged model, ~%.3f GIB in all", disk["checkpoint"] / 1e9,
         disk["merged"] / 1e9, disk["total"] / 1e9)

    # ---- train --------------------------------------------------------------------------------------
    if state.is_main_process:
        if resume.start_over and staging.exists():
            reason = "RESUME=never" if cfg["RESUME"] == "never" else "no complete checkpoint in it"
            step("resume", "removing the earlier partial run %s (%s)", staging, reason)
            shutil.rmtree(staging)
        for path, _ in resume.skipped:
            shutil.rmtree(path, ignore_errors=True)
        staging.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    args = SFTConfig(
        output_dir=str(staging / "checkpoints"), per_device_train_batch_size=cfg["per_device_train_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], learning_rate=cfg["learning_rate"],
        num_train_epochs=cfg["num_train_epochs"], max_steps=cfg["max_steps"], max_length=cfg["max_seq_length"],
        optim=cfg["optim"], logging_steps=cfg["logging_steps"], seed=cfg["seed"], bf16=True,
        gradient_checkpointing=cfg["gradient_checkpointing"], gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps", save_steps=cfg["save_steps"], save_total_limit=cfg["keep_checkpoints"],
        report_to=[], completion_only_loss=True, use_cpu=device == "cpu",
        per_device_eval_batch_size=cfg["per_device_train_batch_size"],
    )
    stopper = StopOnSignalCallback(lambda name: step(
        "signal", "%s received: saving a checkpoint after this step, then stopping (send it again to kill now)", name))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data if len(eval_data) else None, processing_class=tokenizer,
                         callbacks=[MarkCompleteCallback(cfg), stopper])
    keep_trainable_dtypes(trainer)
    resumed_step, finished = 0, False
    if resume.checkpoint is not None:
        saved_state = json.loads((resume.checkpoint / "trainer_state.json").read_text())
        resumed_step, finished = saved_state["global_step"], saved_state["global_step"] >= saved_state["max_steps"]
        step("resume", "resuming from %s (step %d)", resume.checkpoint, resumed_step)
    train_started = time.time()
    if finished:
        step("resume", "training had finished: %d steps restored, none to run", resumed_step)
        restore_finished(trainer, resume.checkpoint)
        train_loss = None
    else:
        # mean over the steps this process ran
        train_loss = trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None
                                   ).training_loss
    train_seconds = time.time() - train_started
    if stopper.received is not None:
        step("stopped", "%s: stopped at step %d of %d; checkpoint saved in %s; run the same command again to resume",
             signal.Signals(stopper.received).name, trainer.state.global_step, trainer.state.max_steps,
             staging / "checkpoints" / f"checkpoint-{trainer.state.global_step}")
        raise SystemExit(128 + stopper.received)
    steps = trainer.state.global_step
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_loss = trainer.evaluate()["eval_loss"] if len(eval_data) else None
    step("train", "%d steps (%d in this run) in %.1fs, train loss %s, held-out loss %s", steps, steps - resumed_step,
         train_seconds, f"{train_loss:.4f}" if train_loss is not None else "n/a",
         f"{eval_loss:.4f}" if eval_loss is not None else "n/a")
    own_gpu = [state.local_process_index] if device.startswith("cuda:") else None  # under torchrun each rank has one
    rank_peaks, loss_curves = gather(peak_memory_report(own_gpu)), gather(losses)

    # ---- save ---------------------------------------------------------------------------------------
    written = ["adapter/"] if cfg["PEFT_CONFIG"] != "Full" else []
    if launch.fsdp:  # every rank takes part in gathering the sharded adapter; rank 0 writes it
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(staging / "adapter"))
    if not state.is_main_process:
        return None  # rank 0 alone merges and writes
    try:
        check_free_disk(staging, disk["adapter"] + disk["merged"], "the adapter and merged model")
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    model = trainer.model.eval()
    if cfg["PEFT_CONFIG"] != "Full" and not launch.fsdp:
        model.save_pretrained(staging / "adapter")
    tokenizer.save_pretrained(staging)
    del trainer  # frees the optimizer state before the merge
    gc.collect()
    release_free_heap()  # what training freed (activations, loss tiles) leaves the process before the merge grows it
    if launch.fsdp:  # FSDP cannot merge in place: rebuild the trained model from the saved adapter
        model = load_adapter_model(cfg["MODEL_NAME"], staging / "adapter", bnb_config, device, cfg["trust_remote_code"])

    # ---- merge --------------------------------------------------------------------------------------
    merge_check = None
    fingerprint_ids = tokenize_for_check(tokenizer, (eval_data if len(eval_data) else train_data).select(range(1)),
                                         FINGERPRINT_TOKENS)[0]["input_ids"][0]
    artifact = {"kind": "adapter_only", "weights_bits": None, "merge_base": None, "primary": "adapter", "fingerprints": {}}
    if cfg["PEFT_CONFIG"] == "Full":
        model.to(torch.bfloat16).save_pretrained(staging)
        artifact = {"kind": "full_bf16", "weights_bits": 16, "merge_base": None, "primary": "merged",
                    "fingerprints": {"merged": logits_fingerprint(model, fingerprint_ids.tolist())}}
    elif cfg["merge_after_train"]:
        check_batches = tokenize_for_check(tokenizer, eval_data.select(range(min(8, len(eval_data)))), cfg["max_seq_length"])
        memory_plan = with_merge_check(memory_plan, [int(b["attention_mask"].sum()) for b in check_batches],
                                       model.config.get_text_config().vocab_size, device.split(":")[0])
        if "merge_check_logits_bytes" in memory_plan:
            step("plan", "merge check over %d tokens: merge phase predicted %.2f GiB (its logits %.2f); peak %.2f GiB",
                 memory_plan["merge_check_tokens"], memory_plan["merge_peak_bytes"] / GIB,
                 memory_plan["merge_check_logits_bytes"] / GIB, memory_plan["peak_gib"])
        _, nf4_config = build_quantization_plan(QuantMethod.QLORA)
        merge_check, merge_artifact = merge_and_check(
            model, staging=staging, model_name=cfg["MODEL_NAME"], batches=check_batches, merge_base=cfg["merge_base"],
            precision=cfg["merged_precision"], head_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[head_dtype],
            max_kl=cfg["merge_check_max_kl"],
            load_trained=lambda: load_adapter_model(cfg["MODEL_NAME"], staging / "adapter", bnb_config, device,
                                                    cfg["trust_remote_code"]),
            load_merged=lambda path: load_merged_dir(path, nf4_config, device, cfg["trust_remote_code"]),
            report=lambda line: step("merge", "%s", line))
        artifact.update(merge_artifact)
        if artifact["lm_head_dtype"] != spec.lm_head_dtype:
            raise RuntimeError(f"saved lm_head is {artifact['lm_head_dtype']}, but the plan says {spec.lm_head_dtype}")
        if merge_check["passed"]:
            step("merge", "kept the %s merge (%s): mean KL %.3g <= merge_check_max_kl %.3g", merge_check["chosen_base"],
                 cfg["merged_precision"], merge_check["mean_kl"], cfg["merge_check_max_kl"])
        else:
            step("merge", "!!! MERGE CHECK FAILED: mean KL %.3g > merge_check_max_kl %.3g; the merged model differs from "
                 "the trained one. The adapter (adapter/, on the 4-bit base) is the primary artifact !!!",
                 merge_check["mean_kl"], cfg["merge_check_max_kl"])
        written.append("model.safetensors")
    model = None  # merged (consumed) or saved: nothing below needs the trained model
    if artifact["primary"] == "adapter":  # what the adapter gives when reloaded on the 4-bit base by the same plan
        artifact["fingerprints"]["adapter"] = logits_fingerprint(load_adapter_model(
            cfg["MODEL_NAME"], staging / "adapter", bnb_config, device, cfg["trust_remote_code"]), fingerprint_ids.tolist())

    # ---- metadata -----------------------------------------------------------------------------------
    peak = combine_peak_reports([peak_memory_report(own_gpu)] + rank_peaks[1:])  # rank 0's again: the merge counts
    metadata = build_metadata(
        spec,
        base_model=cfg["MODEL_NAME"],
        dataset={"name": cfg["DATASET_CHOICE"], "path": cfg["DATASET_PATH"], "train_rows": len(train_data),
                 "eval_rows": len(eval_data), "split_seed": cfg["seed"]},
        peft=peft_name,
        artifact={**artifact, "adapter_dir": "adapter" if cfg["PEFT_CONFIG"] != "Full" else None},
        parameters={"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 4)},
        weights_footprint=footprint,
        training={"steps": steps, "resumed_from_step": resumed_step, "train_loss": train_loss, "loss_curve": losses,
                  "eval_loss": eval_loss, "train_seconds": round(train_seconds, 2),
                  "world_size": launch.world_size, "fsdp": launch.fsdp, "loss_curve_by_rank": loss_curves},
        merge_check=merge_check,
        peak_memory=peak,
        memory_plan=with_measured_peak(memory_plan, peak),
        config=cfg,
        versions=library_versions(),
        created_unix=int(time.time()),
    )
    shutil.rmtree(staging / "checkpoints", ignore_errors=True)
    (staging / "resolved_config.json").write_text(json.dumps(cfg, indent=2))
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=2))
    os.replace(staging, final_dir)

    peak_text = (f"{peak['overall_max_allocated_gib']} GiB allocated / {peak['overall_max_reserved_gib']} GiB reserved (CUDA)"
                 if peak["device"] == "cuda" else f"{peak['peak_rss_gib']} GiB peak RSS (no CUDA)")
    planned = f"planned {memory_plan['peak_gib']} GiB" if memory_plan.get("peak_gib") is not None else "not planned"
    step("done", "%.1fs total; peak memory %s (%s); wrote %s (%s)", time.time() - started, peak_text, planned, final_dir,
         ", ".join(written + ["metadata.json"]))
    return final_dir


if __name__ == "__main__":
    main()
