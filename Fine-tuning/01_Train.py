"""QLoRA supervised fine-tuning of a causal LM, end to end, in one script.

Edit the constants below, or override any of them on the command line as --NAME=value, then run
    python Fine-tuning/01_Train.py
Flow: config -> plan -> data -> model -> train -> save -> merge -> metadata -> publish.
The output is one tagged directory under OUTPUT_ROOT (see docs/QLoRA.md).
"""

import sys
import time
from pathlib import Path


from qlora.model.loading import quiet_bitsandbytes_notices

quiet_bitsandbytes_notices()  # before the imports below load bitsandbytes (transformers' Trainer imports peft)

from qlora.outputs.artifacts import absolute_if_local, library_versions, publish_run
from qlora.train.checkpoints import find_resume_point, prepare_staging
from qlora.config import resolve_config
from qlora.data.chat_format import ensure_chat_template
from qlora.data.formats import dataset_tag, load_training_data
from qlora.train.distributed import (barrier, check_launch, claim_on_main, combine_peak_reports, gather, launch_context,
                        leave_process_group, resolve_quant_storage, start_device)
from qlora.core.errors import UserError
from qlora.outputs.loss_plot import write_loss_plot
from qlora.planner.memory import check_disk_for_run, check_free_disk, explain_disk_full, plan_run, with_measured_peak
from qlora.core.memory import count_parameters, describe_footprint, describe_peak, peak_memory_report, weight_footprint
from qlora.merge.merge import write_model
from qlora.outputs.model_card import write_model_cards
from qlora.model.loading import load_causal_lm, load_tokenizer, pick_device, read_model_config, save_tokenizer
from qlora.checks.generation import check_saved_generation
from quantization_utils import build_metadata, build_quantization_plan, output_dir_name, peft_tag
from qlora.core.logs import setup_logging, step
from qlora.train.setup import (build_trainer, check_target_modules_before_loading, peft_options,
                            prepare_for_training, save_adapter, take_trained_model, train, weights_dtype)

# ----------------------------------------------------------------------------------------------------
# Configuration: every name here can be overridden as --NAME=value
_names_before_config = set(globals())
# -- model and data
MODEL_NAME = "Qwen/Qwen3-0.6B"  # hub id or local directory (safetensors weights)
DATASET_CHOICE = "openmath"  # openmath | squad | messages | prompt_completion | text (docs/QLoRA.md: data formats)
DATASET_PATH = None  # local .jsonl/.json/.parquet/.csv or hub id in DATASET_CHOICE's format; None = openmath/squad's hub dataset
max_train_samples = 20000  # rows read from the dataset (hub datasets are streamed, so only these download)
eval_samples = 64  # held-out rows (same seed -> same split): eval loss and the merge check
trust_remote_code = False  # True runs Python code shipped with the model repo: only for repos you trust
# -- quantization
QUANT_METHOD = "QLORA"  # QLORA (4-bit NF4 + double quant base, bf16 compute) | NONE (bf16 base)
# -- adapters
PEFT_CONFIG = "LoRa"  # LoRa | DoRa (learned per-output magnitude; on QLORA = QDoRA, slower steps) | Full (full fine-tuning)
full_weights_dtype = "bf16"  # Full only: bf16 (small updates round away: low rates stall) | fp32 (master weights, bf16 compute; 2x weight + grad memory)
lora_r = 256  # rank: higher = more trainable params and memory (Qwen3-0.6B, 7 projections: r=64 ~40M, r=256 ~161M)
lora_alpha = 16  # LoRA scale is lora_alpha / lora_r (lora_alpha / sqrt(lora_r) with use_rslora)
use_rslora = False  # False: scale alpha / r (shrinks as r grows) | True: rsLoRA, alpha / sqrt(r) (docs: which to pick)
init_lora_weights = "default"  # default (B = 0) | gaussian (B = 0, A normal) | loftq (QLORA: adapter starts at the rank-r 4-bit error; reads the 16-bit checkpoint)
lora_dropout = 0.05  # dropout on the adapter input, [0, 1)
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # names or globs
# -- training
per_device_train_batch_size = 1  # sequences per step per device; memory grows with it
gradient_accumulation_steps = 16  # effective batch = batch size * this
packing = False  # True: rows packed padding-free into rows of max_seq_length tokens (fewer, fuller steps; rows stay apart)
gradient_checkpointing = True  # recompute activations in backward: less activation memory, slower steps
learning_rate = 2e-4  # AdamW peak learning rate (linear decay)
num_train_epochs = 1.0  # used when max_steps is -1
max_steps = -1  # > 0 stops after this many optimizer steps; -1 = run num_train_epochs
max_seq_length = 1024  # tokens per example; longer ones are truncated
optim = "paged_adamw_8bit"  # paged_adamw_8bit (2 B/param of state) | paged_adamw_32bit (8 B) | adamw_torch | adamw_bnb_8bit | adafactor
bnb_4bit_quant_storage = "auto"  # auto (bfloat16 under FSDP, else uint8) | uint8 | bfloat16 | float16 | float32
logging_steps = 10  # log the loss every this many optimizer steps
save_steps = 50  # resumable checkpoint (and held-out loss) every this many steps: fewer = less work lost to a crash, more disk writes
keep_checkpoints = 2  # newest checkpoints kept while training (>= 1); each costs disk (the log prints the estimate)
RESUME = "auto"  # auto (continue an interrupted run from its newest complete checkpoint) | never | a checkpoint dir
seed = 42  # data split, adapter init and shuffling
# -- memory
memory_limit_gb = "auto"  # GiB the run may use: auto (free GPU memory, or the host's available RAM) | a number | off
dry_run = False  # True: check the config, tokenize a sample of rows, print the memory/disk plan and exit; no weights load
# -- tracking
report_to = "none"  # experiment tracker(s) the Trainer logs to: none | tensorboard | trackio | wandb | ... (comma-separated, installed)
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


def main(argv=None) -> Path | None:
    launch = launch_context()  # torchrun / accelerate launch: one process per device; rank 0 logs and writes
    setup_logging(launch.is_main)
    started, disk = time.time(), None
    try:
        # ---- config ---------------------------------------------------------------------------------
        cfg = resolve_config({name: globals()[name] for name in CONFIG_NAMES},
                             sys.argv[1:] if argv is None else list(argv))
        model_config = read_model_config(cfg["MODEL_NAME"], cfg["max_seq_length"], cfg["trust_remote_code"])
        check_launch(launch, cfg)
        check_target_modules_before_loading(cfg)
        root = Path(cfg["OUTPUT_ROOT"])
        step("config", "%s", cfg)
        # ---- data -----------------------------------------------------------------------------------
        tokenizer = load_tokenizer(cfg["MODEL_NAME"], cfg["trust_remote_code"])
        prompt_format = ensure_chat_template(tokenizer, cfg["MODEL_NAME"])  # "model" | "plain" (saved with the output)
        data = load_training_data(cfg, tokenizer)
        step("data", "%s; chat template: %s", data.describe(), prompt_format)
        # ---- plan -----------------------------------------------------------------------------------
        spec, bnb_config = build_quantization_plan(
            cfg["QUANT_METHOD"], lm_head_dtype="fp16" if cfg["keep_lm_head_fp16"] else "bf16", lora_r=cfg["lora_r"],
            merge_after_train=cfg["merge_after_train"],
            quant_storage=resolve_quant_storage(cfg["bnb_4bit_quant_storage"], launch.fsdp))
        peft_name = peft_tag(cfg["PEFT_CONFIG"], cfg["lora_r"])
        memory_plan = plan_run(model_config, cfg, pick_device(), data, tokenizer)  # refuses a run that cannot fit
        if cfg["dry_run"]:
            return None
        device = start_device(launch, cfg["seed"])  # joins the process group of a distributed launch
        dataset_word = dataset_tag(cfg["DATASET_CHOICE"], cfg["DATASET_PATH"])
        name = output_dir_name(cfg["MODEL_NAME"], dataset_word, peft_name, spec)
        with claim_on_main(launch.is_main, root, name, cfg["if_output_exists"]) as run:  # the lock is held to publish
            step("plan", "%s %s -> %s (staging in %s)", spec.method.value, peft_name, run.final, run.staging)
            if run.staged_complete and launch.is_main:
                step("publish", "the staged run had finished all but its rename: publishing it without training")
                return run.publish()
            resume = find_resume_point(cfg["RESUME"], run.staging / "checkpoints", cfg)
            # ---- model ------------------------------------------------------------------------------
            model = load_causal_lm(cfg["MODEL_NAME"], bnb_config, device, cfg["trust_remote_code"], dtype=weights_dtype(cfg),
                                   for_fsdp=launch.fsdp)
            footprint = weight_footprint(model)
            step("model", "%s on %s: %s", cfg["MODEL_NAME"], device, describe_footprint(footprint))
            model = prepare_for_training(model, cfg, quantized=bnb_config is not None, fsdp=launch.fsdp)
            trainable, total = count_parameters(model)
            step("model", "trainable params %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
            disk = check_disk_for_run(model, cfg, root)
            # ---- train ------------------------------------------------------------------------------
            if launch.is_main:
                prepare_staging(run.staging, resume, cfg["RESUME"])
            barrier()
            trainer = build_trainer(model, tokenizer, cfg, data.train, data.held_out, run.staging / "checkpoints", device,
                                    **data.sft_options)
            result = train(trainer, resume.checkpoint)
            step("train", "%d steps (%d in this run) in %.1fs, %s", result.steps, result.steps - result.resumed_step,
                 result.seconds, result.losses_text())
            own_gpu = [launch.local_rank] if device.startswith("cuda:") else None  # one GPU per rank
            rank_peaks, loss_curves = gather(peak_memory_report(own_gpu)), gather(result.loss_curve)
            # ---- save -------------------------------------------------------------------------------
            save_adapter(trainer, run.staging / "adapter", launch.fsdp, launch.is_main, cfg["MODEL_NAME"], bnb_config, tokenizer)
            if not launch.is_main:
                return None  # rank 0 alone merges and writes
            check_free_disk(run.staging, disk["adapter"] + disk["merged"], "the adapter and merged model")
            save_tokenizer(tokenizer, run.staging)
            model = take_trained_model(trainer, cfg, bnb_config, device, run.staging / "adapter", launch.fsdp)
            # ---- merge ------------------------------------------------------------------------------
            merge_check, artifact, memory_plan = write_model(
                model, cfg=cfg, staging=run.staging, tokenizer=tokenizer,
                check_rows=data.held_out if len(data.held_out) else data.train, bnb_config=bnb_config, device=device,
                memory_plan=memory_plan, report=lambda line: step("merge", "%s", line))
            generation = check_saved_generation(  # the model as saved: merged, or the adapter when it is primary
                run.staging, primary=artifact["primary"], base_model=cfg["MODEL_NAME"], bnb_config=bnb_config,
                device=device, trust_remote_code=cfg["trust_remote_code"], rows=data.held_out,
                report=lambda line: step("generate", "%s", line))
            # ---- metadata ---------------------------------------------------------------------------
            peak = combine_peak_reports([peak_memory_report(own_gpu)] + rank_peaks[1:])  # rank 0's again: the merge counts
            metadata = build_metadata(
                spec, base_model=absolute_if_local(cfg["MODEL_NAME"]), peft=peft_name, peft_options=peft_options(cfg), config=cfg,
                versions=library_versions(), dataset={**data.metadata(), "prompt_format": prompt_format},
                artifact={**artifact, "adapter_dir": "adapter" if cfg["PEFT_CONFIG"] != "Full" else None},
                parameters={"trainable": trainable, "total": total, "trainable_percent": round(100 * trainable / total, 4)},
                weights_footprint=footprint, merge_check=merge_check, generation_check=generation, peak_memory=peak,
                training=result.metadata(world_size=launch.world_size, fsdp=launch.fsdp, loss_curve_by_rank=loss_curves),
                memory_plan=with_measured_peak(memory_plan, peak), created_unix=int(time.time()))
            # ---- publish ----------------------------------------------------------------------------
            write_loss_plot(run.staging, metadata)  # training_loss.png
            write_model_cards(run.staging, metadata, run.final.name)  # README.md, adapter/README.md
            final_dir = publish_run(run, cfg, metadata)
        step("done", "%.1fs total; peak memory %s (planned %s GiB); wrote %s", time.time() - started,
             describe_peak(peak), memory_plan.get("peak_gib"), final_dir)
        return final_dir
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    except (OSError, RuntimeError) as err:  # a save that filled the disk: say how much it needs, and that a rerun resumes
        full = explain_disk_full(err, disk["total"] if disk else 0, Path(cfg["OUTPUT_ROOT"]))
        if full is None:
            raise
        raise SystemExit(f"error: {full}") from None
    finally:
        leave_process_group()  # every rank, however it leaves: no group is left to the exit-time destructors


if __name__ == "__main__":
    main()
