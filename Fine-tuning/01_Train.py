"""QLoRA supervised fine-tuning of a causal LM, end to end, in one script.

Edit the constants below, or override any of them on the command line as --NAME=value, then run
    python Fine-tuning/01_Train.py
Flow: config -> data -> plan -> model -> train -> save -> merge -> metadata -> publish.
The output is one tagged directory under OUTPUT_ROOT (see docs/QLoRA.md).
"""

import sys
import time
from pathlib import Path

from qlora.model.loading import quiet_bitsandbytes_notices

quiet_bitsandbytes_notices()  # before the imports below load bitsandbytes (transformers' Trainer imports peft)

from qlora.checks.generation import check_trained_generation
from qlora.config import check_model_before_loading, resolve_config
from qlora.core.errors import one_line_errors
from qlora.core.files import check_free_disk, disk_full_is_a_user_error
from qlora.core.logs import step
from qlora.core.memory import count_parameters, describe_peak, phase_peaks
from qlora.data.chat_format import ensure_chat_template
from qlora.data.formats import dataset_tag, load_training_data
from qlora.model.loading import load_base_model, load_tokenizer, pick_device, save_tokenizer
from qlora.outputs.publish import publish_run, run_metadata
from qlora.outputs.run_dir import claim_on_main, publish_staged
from qlora.outputs.write import write_model
from qlora.planner.disk import check_disk_for_run
from qlora.planner.memory import plan_run
from qlora.train.adapter import save_adapter, take_trained_model
from qlora.train.checkpoints import find_resume_point, prepare_staging
from qlora.train.distributed import (barrier, combine_peak_reports, end_collectives, gather, launched, own_peak_memory,
                                     resolve_quant_storage, start_device)
from qlora.train.peft import DEFAULT_TARGET_MODULES, prepare_for_training, weights_dtype
from qlora.train.trainer import build_trainer, train
from quantization_utils import build_quantization_plan, output_dir_name, peft_tag

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
target_modules = list(DEFAULT_TARGET_MODULES)  # names or globs; default: q,k,v,o and gate,up,down projections
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
    with launched() as launch, one_line_errors(), phase_peaks() as phases:  # one process per device; rank 0 writes
        started = time.time()
        # ---- config ---------------------------------------------------------------------------------
        cfg = resolve_config({name: globals()[name] for name in CONFIG_NAMES}, sys.argv[1:] if argv is None else argv)
        model_config = check_model_before_loading(cfg, launch)  # config.json only: context, launch, target modules
        root = Path(cfg["OUTPUT_ROOT"])
        step("config", "%s", cfg)
        spec, bnb_config = build_quantization_plan(
            cfg["QUANT_METHOD"], lm_head_dtype="fp16" if cfg["keep_lm_head_fp16"] else "bf16", lora_r=cfg["lora_r"],
            merge_after_train=cfg["merge_after_train"],
            quant_storage=resolve_quant_storage(cfg["bnb_4bit_quant_storage"], launch.fsdp))
        name = output_dir_name(cfg["MODEL_NAME"], dataset_tag(cfg["DATASET_CHOICE"], cfg["DATASET_PATH"]),
                               peft_tag(cfg["PEFT_CONFIG"], cfg["lora_r"]), spec)
        device = None if cfg["dry_run"] else start_device(launch, cfg["seed"])  # joins a distributed launch's group
        # the name is claimed before the data is read (a held name is refused at once); a dry run claims nothing
        with claim_on_main(launch.is_main, root, name, cfg["if_output_exists"], cfg["dry_run"]) as run:
            # ---- data -------------------------------------------------------------------------------
            step("data", "reading the tokenizer and %s", cfg["DATASET_PATH"] or f"the {cfg['DATASET_CHOICE']} hub dataset")
            tokenizer = load_tokenizer(cfg["MODEL_NAME"], cfg["trust_remote_code"])
            prompt_format = ensure_chat_template(tokenizer, cfg["MODEL_NAME"])  # "model" | "plain" (saved with the output)
            data = load_training_data(cfg, tokenizer)
            step("data", "%s; chat template: %s", data.describe(), prompt_format)
            # ---- plan -------------------------------------------------------------------------------
            memory_plan = plan_run(model_config, cfg, pick_device(), data, tokenizer)  # refuses a run that cannot fit
            if run is None:  # dry run
                return None
            step("plan", "%s -> %s (staging in %s)", spec.method.value, run.final, run.staging)
            if run.staged_complete and launch.is_main:
                return publish_staged(run)  # a killed run that had finished all but its rename
            resume = find_resume_point(cfg["RESUME"], run.staging / "checkpoints", cfg)
            # ---- model ------------------------------------------------------------------------------
            model, footprint = load_base_model(cfg["MODEL_NAME"], bnb_config, device, cfg["trust_remote_code"],
                                               weights_dtype(cfg), for_fsdp=launch.fsdp)
            model = prepare_for_training(model, cfg, quantized=bnb_config is not None, fsdp=launch.fsdp)
            parameters = count_parameters(model)  # (trainable, total)
            disk = check_disk_for_run(model, cfg, root)
            with disk_full_is_a_user_error(disk["total"], root):  # a full disk: one line, and a rerun resumes
                # ---- train --------------------------------------------------------------------------
                if launch.is_main:
                    prepare_staging(run.staging, resume, cfg["RESUME"])
                barrier()
                trainer = build_trainer(model, tokenizer, cfg, data.train, data.held_out, run.staging / "checkpoints",
                                        device, **data.sft_options)
                result = train(trainer, resume.checkpoint)
                rank_peaks, loss_curves = gather(own_peak_memory(launch, device)), gather(result.loss_curve)
                # ---- save ---------------------------------------------------------------------------
                save_adapter(trainer, run.staging / "adapter", launch.fsdp, launch.is_main, cfg["MODEL_NAME"], bnb_config,
                             tokenizer)
                end_collectives()  # every rank leaves the process group together; rank 0 alone merges and writes
                if not launch.is_main:
                    return None
                check_free_disk(run.staging, disk["adapter"] + disk["merged"], "the adapter and merged model")
                save_tokenizer(tokenizer, run.staging)
                model = take_trained_model(trainer, cfg, bnb_config, device, run.staging / "adapter", launch.fsdp)
                generation = check_trained_generation(model, tokenizer, data.held_out, result.seconds,
                                                      cfg["per_device_train_batch_size"])
                # ---- merge --------------------------------------------------------------------------
                merge_check, artifact = write_model(model, cfg=cfg, staging=run.staging, tokenizer=tokenizer,
                                                    check_rows=data.held_out or data.train, bnb_config=bnb_config, device=device)
            # ---- metadata ---------------------------------------------------------------------------
            peak = combine_peak_reports([own_peak_memory(launch, device)] + rank_peaks[1:], phases.report())
            metadata = run_metadata(
                spec=spec, cfg=cfg, data=data, prompt_format=prompt_format, parameters=parameters, footprint=footprint,
                artifact=artifact, merge_check=merge_check, generation=generation, peak=peak, memory_plan=memory_plan,
                training=result.metadata(world_size=launch.world_size, fsdp=launch.fsdp, loss_curve_by_rank=loss_curves))
            final_dir = publish_run(run, cfg, metadata)  # loss plot, model cards, metadata.json; then the rename
        step("done", "%.1fs total; peak memory %s (planned %s GiB); wrote %s", time.time() - started,
             describe_peak(peak), memory_plan.get("peak_gib"), final_dir)
        return final_dir


if __name__ == "__main__":
    main()
