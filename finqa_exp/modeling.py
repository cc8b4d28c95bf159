"""Models: loading the base (4-bit NF4 or not), the LoRA adapter, and the base a sweep's
trials share.

A base is a folder or a hub id: ``model=tiny`` (the default) is built offline by
finqa_exp/tiny.py; hub presets (``model=tinyllama``, ``model=llama2_7b``) load
``model.name_or_path`` with ``from_pretrained``, the only network call.

The builders that turn config into library objects (:func:`quantization_config`,
:func:`lora_config`) are small and pure so each can be unit-tested.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from finqa_exp import corpus
from finqa_exp import data as data_lib
from finqa_exp.config import DataConfig, FinqaConfig, LoraConfig, ModelConfig, QuantConfig
from finqa_exp.devices import native_bf16

log = logging.getLogger(__name__)
# bitsandbytes warns at import that it cannot fetch an optional CPU kernel from the hub;
# the built-in kernel is used instead, so the warning only alarms users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def resolve_dtype(name: str, dev: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPUs that compute in it natively, fp16 on older GPUs (T4, V100),
    fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if dev.type == "cuda":
        return torch.bfloat16 if native_bf16(dev) else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------- builders


def quantization_config(quant: QuantConfig, dev: torch.device) -> Any | None:
    """``quant`` as a transformers BitsAndBytesConfig (NF4 + double quant), or None."""
    if not quant.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(quant.compute_dtype, dev),
    )


def lora_config(lora: LoraConfig) -> Any:
    """``lora`` as a peft LoraConfig for causal-LM training."""
    import peft

    return peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------- loading


def load_tokenizer(name_or_path: str | Path, model: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token (Llama tokenizers ship none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(name_or_path), revision=model.revision, trust_remote_code=model.trust_remote_code
    )
    if tokenizer.pad_token is None:
        # unk, not eos: padding with eos would hide the answers' end-of-sequence token.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str | Path, model: ModelConfig, quant: QuantConfig, dev: torch.device
) -> Any:
    """The frozen base model, 4-bit NF4 when ``quant.load_in_4bit``.

    The dtype policy is decided here, once: every weight that is not 4-bit (embeddings,
    norms, LM head) is loaded in the compute dtype (``quant.compute_dtype``: bf16 on
    recent GPUs, fp32 on CPU) and nothing casts it later. So the base scored before
    training, the tuned model, ``ask`` and an exported model all run the same weights.
    (peft's ``prepare_model_for_kbit_training`` would cast them to fp32 in place, after the
    base was scored and for every later trial sharing it, at about 260 MB for TinyLlama.)
    """
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(quant, dev)
    kwargs: dict[str, Any] = {
        "revision": model.revision,
        "trust_remote_code": model.trust_remote_code,
        "device_map": {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"},
        "dtype": resolve_dtype(quant.compute_dtype, dev),
    }
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    base = AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)
    base.config.use_cache = False
    if qconfig is not None and dev.type == "cpu":
        keep_cpu_4bit_trainable(base)
    return base


def hub_commit(name_or_path: str | None, revision: str | None) -> str | None:
    """The commit a hub model was loaded at, read from the local hub cache (its ``refs/``,
    written by the load; no network); None for a folder or when the cache does not say."""
    if not name_or_path or Path(name_or_path).exists():
        return None
    from huggingface_hub import HfApi

    try:
        found = HfApi().resolve_revision(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # not in this cache (another cache_dir, a gated repo never loaded)
        return None
    return getattr(found, "resolved", None)


def keep_cpu_4bit_trainable(model: Any) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, the first forward pass in eval mode repacks each Linear4bit
    weight in place; after that no gradient reaches the LoRA weights (bitsandbytes 0.50),
    so a model scored before training would silently never train. One weight layout for
    training and generation also keeps scores reproducible.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def activation_bytes(config: Any, batch_size: int, seq_len: int) -> int:
    """Estimated activation memory of one training step without checkpointing, in bytes.

    Per layer, 16-bit activations of a transformer block take about ``34·s·b·h`` bytes
    (Korthikanti et al. 2022, "Reducing Activation Recomputation"); eager attention adds
    ``5·a·s²·b`` for its scores, which SDPA and flash attention never materialize. The fp32
    logits and their gradient add ``8·s·b·V``.
    """
    s, b = seq_len, batch_size
    h, a = config.hidden_size, config.num_attention_heads
    per_layer = 34 * s * b * h
    if getattr(config, "_attn_implementation", None) in (None, "eager"):
        per_layer += 5 * a * s * s * b
    return per_layer * config.num_hidden_layers + 8 * s * b * config.vocab_size


def available_gpu_bytes(dev: torch.device) -> int:
    """Memory this process can still allocate on ``dev``: the driver's free memory plus the
    blocks PyTorch holds cached but unused (``mem_get_info`` counts those as taken, so a
    later trial of the same sweep would otherwise see less than the first)."""
    free, _ = torch.cuda.mem_get_info(dev)
    cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    return free + cached


def use_gradient_checkpointing(
    setting: str, config: Any, batch_size: int, seq_len: int, dev: torch.device
) -> bool:
    """``model.gradient_checkpointing``: true/false as given; auto turns it on only on a GPU
    whose available memory (after loading the model) is less than the estimated activations
    plus a margin. Checkpointing costs about a third more compute, so never by default."""
    if setting != "auto":
        return setting == "true"
    if dev.type != "cuda":
        return False
    need = activation_bytes(config, batch_size, seq_len)
    return need > 0.8 * available_gpu_bytes(dev)


# Non-reentrant checkpointing: the reentrant kind (torch's old default, and what peft's
# prepare_model_for_kbit_training ends up with) needs inputs that require grad and does
# not support every autograd feature.
CHECKPOINT_KWARGS = {"use_reentrant": False}


def set_activation_checkpointing(model: Any, on: bool) -> None:
    """Turn activation (gradient) checkpointing of ``model``'s layers on or off."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers 5 names it so; the old name warns
            enable(activation_checkpointing_kwargs=dict(CHECKPOINT_KWARGS))
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=dict(CHECKPOINT_KWARGS)
            )
        return
    if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        # A reused base keeps the setting of the trial before (see SharedBase).
        disable = getattr(model, "activation_checkpointing_disable", None)
        (disable or model.gradient_checkpointing_disable)()
        if hasattr(model, "_require_grads_hook"):  # set by enabling it: no longer needed
            model.disable_input_require_grads()


def add_lora(base: Any, lora: LoraConfig, gradient_checkpointing: bool) -> Any:
    """Wrap the base in a trainable peft LoRA adapter; only adapter weights require grad.

    The base is used as loaded (see :func:`load_base_model`): peft freezes its weights and
    nothing changes their dtype.
    """
    import peft

    set_activation_checkpointing(base, gradient_checkpointing)
    return peft.get_peft_model(base, lora_config(lora))


def remove_lora(model: Any) -> Any:
    """The base model with the adapter's layers taken out again, as it was loaded."""
    return model.unload()


class SharedBase:
    """The loaded base model and tokenizer, kept for the next trial in this process.

    A sweep's jobs run one after another in one process (or one per joblib worker). Each
    trial adds its LoRA layers to the same frozen 4-bit base; the next trial takes them out
    again (peft's ``unload``) instead of loading the base again. The tuned model stays
    usable until then. Holds one base at a time.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.tokenizer: Any = None
        self.model: Any = None
        self.adapted: Any = None  # the last trial's peft model, wrapping self.model

    def get(
        self, name_or_path: str | Path, model: ModelConfig, quant: QuantConfig, dev: torch.device
    ) -> tuple[Any, Any, bool]:
        """(tokenizer, base model, whether it was reused) for this source and quantization."""
        key = json.dumps(
            [str(name_or_path), model.revision, model.trust_remote_code, asdict(quant), str(dev)]
        )
        if key == self.key and self.remove_adapter():
            return self.tokenizer, self.model, True
        self.clear()
        tokenizer = load_tokenizer(name_or_path, model)
        base = load_base_model(name_or_path, model, quant, dev)
        self.key, self.tokenizer, self.model = key, tokenizer, base
        return tokenizer, base, False

    def add_lora(self, lora: LoraConfig, gradient_checkpointing: bool) -> Any:
        """:func:`add_lora` on the shared base; remembered so the next trial can remove it."""
        try:
            self.adapted = add_lora(self.model, lora, gradient_checkpointing)
        except BaseException:
            self.clear()  # peft may have stopped half-way through injecting layers
            raise
        return self.adapted

    def remove_adapter(self) -> bool:
        """Take the last trial's adapter out of the base; False if that failed."""
        if self.adapted is None:
            return True
        try:
            base = remove_lora(self.adapted)
        except Exception as err:  # never train on a base with a stale adapter in it
            log.warning("could not remove the last adapter (%s); loading the base again", err)
            return False
        self.adapted = None
        return base is self.model

    def discard_adapter(self) -> None:
        """Drop a failed or pruned trial's adapter now, with its weights and gradients,
        rather than when the next trial starts (it would count in that trial's peak)."""
        if not self.remove_adapter():
            self.clear()

    def clear(self) -> None:
        """Forget the base: the next :meth:`get` loads it again."""
        self.key = self.tokenizer = self.model = self.adapted = None
        import gc

        gc.collect()
        if torch.cuda.is_initialized():  # never start CUDA just to clean up
            torch.cuda.empty_cache()


shared_base = SharedBase()


# ----------------------------------------------------------------------------- a trial's base


@dataclass
class Base:
    """The base model as a trial uses it, with its tokenizer and tokenized splits."""

    source: str
    tokenizer: Any
    model: Any
    device: torch.device
    train_ds: Any
    eval_ds: Any
    data_key: str  # identifies tokenizer, data, template and max length


def base_model_source(conf: FinqaConfig, splits: data_lib.Splits | corpus.TextSplits) -> str:
    """Local folder or hub id of the base model; builds (or reuses) the tiny one if asked.

    The tiny base learns the domain from Q&A pairs: these, or for text data the bundled
    pairs, so that adapting it to a corpus it has never read is real adaptation."""
    from finqa_exp import tiny

    if conf.model.name_or_path:
        return conf.model.name_or_path
    if isinstance(splits, corpus.TextSplits):
        splits = data_lib.load_splits(DataConfig())
    return str(tiny.build_tiny_base(conf.model.tiny, splits.train, conf.paths.cache_dir))


def tokenized_splits(
    conf: FinqaConfig, splits: data_lib.Splits | corpus.TextSplits, tokenizer: Any, key: str
) -> tuple[Any, Any]:
    """Train and test datasets: each Q&A pair as prompt + answer (the loss on the answer),
    or a corpus split packed into blocks of ``data.max_length`` (the loss on every token)."""
    d = conf.data
    if isinstance(splits, corpus.TextSplits):
        return (
            corpus.blocks_dataset(tokenizer, splits.train, d.max_length, f"train-{key}"),
            corpus.blocks_dataset(tokenizer, splits.test, d.max_length, f"test-{key}"),
        )
    template, max_len = d.prompt_template, d.max_length
    return (
        data_lib.tokenize(tokenizer, template, splits.train, max_len, f"train-{key}"),
        data_lib.tokenize(tokenizer, template, splits.test, max_len, f"test-{key}"),
    )


def load_base(
    conf: FinqaConfig, splits: data_lib.Splits | corpus.TextSplits, dev: torch.device
) -> Base:
    """The base model, loaded once per process (a sweep's later trials reuse it: adapters
    are swapped), and the tokenized splits."""
    source = base_model_source(conf, splits)
    quant = "4-bit " + conf.quant.quant_type if conf.quant.load_in_4bit else "not quantized"
    log.info("base model %s (%s)", source, quant)
    tokenizer, model, reused = shared_base.get(source, conf.model, conf.quant, dev)
    log.info("base model %s", "reused from the previous trial" if reused else "loaded")
    if dev.type == "cuda":
        # From here on: what this trial adds to the resident base, loaded or reused.
        torch.cuda.reset_peak_memory_stats(dev)
    d = conf.data
    key = data_lib.cache_key(
        source, conf.model.revision, splits.fingerprint(), d.format, d.prompt_template,
        d.max_length,
    )  # fmt: skip
    train_ds, eval_ds = tokenized_splits(conf, splits, tokenizer, key)
    return Base(source, tokenizer, model, dev, train_ds, eval_ds, key)


@dataclass
class Adapter:
    """The base with this trial's LoRA adapter, and whether activation checkpointing is on."""

    model: Any
    checkpointing: bool


def add_adapter(conf: FinqaConfig, base: Base) -> Adapter:
    """The base with this trial's LoRA adapter (the shared base's; one at a time)."""
    from transformers import set_seed

    longest = max(len(ex["input_ids"]) for ex in base.train_ds)
    checkpointing = use_gradient_checkpointing(
        conf.model.gradient_checkpointing, base.model.config, conf.train.batch_size, longest,
        base.device,
    )  # fmt: skip
    # Seed before the adapter is created: LoRA's A matrices are drawn from the global RNG,
    # which building the tiny base or scoring has already advanced by a varying amount.
    set_seed(conf.train.seed)
    model = shared_base.add_lora(conf.lora, checkpointing)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA r=%d: %d trainable of %d parameters; gradient checkpointing %s",
        conf.lora.r, trainable, total, "on" if checkpointing else "off",
    )  # fmt: skip
    return Adapter(model, checkpointing)
