"""The benchmark's measurements, each one pair run side by side (see finqa_exp.bench).

Every function here measures; none of them judges. The ratios and targets are computed
from what these return, in finqa_exp.bench.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from finqa_exp import devices, modeling, training
from finqa_exp.config import LoraConfig, TrainConfig
from finqa_exp.data import IGNORE_INDEX
from finqa_exp.evaluation import generate_answers
from finqa_exp.tracking import environment_tags

# The seed project's recipe (TinyLlama): LoRA r=16/alpha=32/dropout 0.05 on q,k,v,o_proj,
# lr 2e-4, batch 8, every example padded to 512 tokens, Trainer defaults otherwise.
SEED_LORA = LoraConfig(
    r=16, alpha=32, dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
)
SEED_LR, SEED_BATCH, SEED_MAX_LENGTH = 2e-4, 8, 512

# TinyLlama-1.1B's shape (its config.json on the hub), initialised at random: the GPU rows
# need no download.
TINYLLAMA_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32000,
}


def machine(dev: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": devices.describe_device(dev),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "os": platform.platform(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    tags = environment_tags(info["device"])
    info.update({k: v for k, v in tags.items() if k != "device" and not k.startswith("mlflow.")})
    return info


def padding_share(lengths: list[int], max_length: int) -> float:
    """Share of the tokens that are padding when every example is padded to ``max_length``."""
    real = sum(min(n, max_length) for n in lengths)
    return 1 - real / (len(lengths) * max_length)


def random_llama(tokenizer: Any, folder: Path, shape: dict[str, Any] = TINYLLAMA_SHAPE) -> Path:
    """A Llama of ``shape`` (TinyLlama's by default) with random weights, saved in bf16 for
    4-bit loading; kept in ``folder`` for the next run.

    Written to a temporary folder and renamed, so that a run killed half-way, or another
    process building it too, never leaves a half-written model to load. Initialised on the
    GPU where there is one (seconds instead of a minute for 1.1B parameters), then freed.
    """
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    where = devices.device().type
    torch.manual_seed(0)
    with torch.device(where):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if where == "cuda":
        torch.cuda.empty_cache()
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    """Start a peak from what the arm itself holds: the previous arm's garbage collected and
    its cached blocks returned, so neither arm's reserved peak starts from the other's pool."""
    if dev.type == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> dict[str, float] | None:
    """PyTorch's peak allocated and reserved memory; nvidia-smi would show reserved plus the
    CUDA context (a few hundred MiB)."""
    if dev.type != "cuda":
        return None
    return {
        "allocated": torch.cuda.max_memory_allocated(dev) / 2**20,
        "reserved": torch.cuda.max_memory_reserved(dev) / 2**20,
    }


def ours_args(output_dir: Path, dev: torch.device, max_steps: int = -1) -> Any:
    """Our trial's TrainingArguments for the seed's lr and batch: dynamic, length-grouped
    batches and bf16 on GPUs that have it."""
    cfg = TrainConfig(
        learning_rate=SEED_LR,
        batch_size=SEED_BATCH,
        epochs=1,
        max_steps=max_steps,
        eval_strategy="no",
        logging_steps=10**6,
    )
    args = training.training_arguments(cfg, output_dir, dev, has_eval=False)
    args.disable_tqdm = True
    return args


def seed_args(output_dir: Path, dev: torch.device) -> Any:
    """The seed recipe's TrainingArguments: Trainer defaults but for lr, batch and epochs,
    in the same precision as ours, so that the pair compares padding and batching alone
    (the seed project trained in fp32 autocast-free; that difference is not ours to claim).
    """
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=SEED_LR,
        per_device_train_batch_size=SEED_BATCH,
        num_train_epochs=1,
        save_strategy="no",
        report_to="none",
        logging_steps=10**6,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        use_cpu=dev.type != "cuda",
        disable_tqdm=True,
        **devices.mixed_precision(TrainConfig(), dev),
    )


def seed_collator(tokenizer: Any) -> Any:
    """Every example padded to 512 tokens, as the seed project's tokenization did."""
    from transformers import DataCollatorForSeq2Seq

    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(
        tokenizer, padding="max_length", max_length=SEED_MAX_LENGTH, label_pad_token_id=IGNORE_INDEX
    )


def _train_once(base: Any, tokenizer: Any, dataset: Any, args: Any, collator: Any, dev) -> dict:
    from transformers import Trainer, set_seed

    set_seed(0)
    model = modeling.add_lora(base, SEED_LORA, gradient_checkpointing=False)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    _reset_peak(dev)
    start = time.perf_counter()
    trainer.train()
    _sync(dev)
    seconds = time.perf_counter() - start
    peak = _peak_mb(dev)
    tokens = int(trainer.state.num_input_tokens_seen)
    modeling.remove_lora(model)
    return {
        "seconds": seconds,
        "real_tokens": tokens,
        "steps": trainer.state.global_step,
        "real_tokens_per_s": tokens / seconds,
        "peak_memory_mb": peak,
    }


def training_pair(base: Any, tokenizer: Any, dataset: Any, dev: torch.device) -> dict[str, Any]:
    """Our training vs the seed recipe's on the same examples, model and LoRA: one epoch
    each over ``dataset``, so both see exactly the same real tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Warm-up (kernels, allocator, lazy imports) so that neither side pays for it.
        warm = dataset.select(range(min(len(dataset), 2 * SEED_BATCH)))
        _train_once(
            base, tokenizer, warm, ours_args(out, dev, 2), training.collator(tokenizer, dev), dev
        )
        ours = _train_once(
            base, tokenizer, dataset, ours_args(out, dev), training.collator(tokenizer, dev), dev
        )
        seed = _train_once(
            base, tokenizer, dataset, seed_args(out, dev), seed_collator(tokenizer), dev
        )
    return {"examples": len(dataset), "ours": ours, "seed": seed}


def eval_pair(
    model: Any,
    tokenizer: Any,
    template: str,
    questions: list[str],
    max_new_tokens: int,
    batch_size: int,
    dev: torch.device,
) -> dict[str, Any]:
    """Greedy answers to the same questions, batched vs one at a time."""

    def timed(bs: int) -> tuple[float, list[str]]:
        _sync(dev)
        start = time.perf_counter()
        answers = generate_answers(model, tokenizer, template, questions, max_new_tokens, bs)
        _sync(dev)
        return time.perf_counter() - start, answers

    generate_answers(model, tokenizer, template, questions[:2], 4, 2)  # warm-up
    batched_s, batched = timed(batch_size)
    single_s, single = timed(1)
    return {
        "questions": len(questions),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "batched": {"seconds": batched_s, "answers_per_s": len(questions) / batched_s},
        "single": {"seconds": single_s, "answers_per_s": len(questions) / single_s},
        # Left padding changes float rounding a little; how often the answer text differs:
        "same_answers": sum(a == b for a, b in zip(batched, single)) / len(questions),
    }


def bf16_peak_flops(dev: torch.device, n: int = 8192, repeats: int = 50) -> float:
    """Measured dense bf16 matmul FLOP/s of this GPU (the denominator of MFU)."""
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    _sync(dev)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(dev)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def count_params(model: Any) -> int:
    """Parameters of the base model as in its config (4-bit packing halves numel())."""
    cfg = model.config
    h, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return layers * per_layer + 2 * cfg.vocab_size * h + h
