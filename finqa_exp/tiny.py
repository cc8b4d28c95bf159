"""The offline tiny Llama (``model=tiny``, the default): built here, once, and cached.

A byte-level BPE tokenizer is trained on the training split with the ``tokenizers``
library, a 2-layer Llama is built from ``model.tiny`` and pre-trained briefly on the same
plain text (no Q&A template), and both are saved under ``paths.cache_dir/tiny/<key>``.
No network is needed; finqa_exp/modeling.py loads the folder like any other model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from finqa_exp.config import TinyModelConfig
from finqa_exp.data import QAPair

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "<pad>"}


def llama_config(tiny: TinyModelConfig, tokenizer: Any) -> Any:
    """The tiny model's transformers LlamaConfig."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
    )


def pretraining_texts(pairs: list[QAPair]) -> list[str]:
    """Plain domain text: each training question followed by its answer, with no template."""
    return [f"{p.question}\n{p.answer}" for p in pairs]


def tiny_cache_key(tiny: TinyModelConfig, texts: list[str]) -> str:
    h = hashlib.sha256(json.dumps(asdict(tiny), sort_keys=True).encode())
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def pretrain(model: Any, tokenizer: Any, texts: list[str], tiny: TinyModelConfig) -> list[float]:
    """A few epochs of full-parameter causal-LM training on ``texts``; returns epoch losses."""
    gen = torch.Generator().manual_seed(tiny.seed)
    encoded = [
        tokenizer(t, truncation=True, max_length=tiny.max_position_embeddings)["input_ids"]
        for t in texts
    ]
    encoded = [[*ids, tokenizer.eos_token_id] for ids in encoded]
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.pretrain_learning_rate, weight_decay=0.0)
    steps_per_epoch = -(-len(encoded) // tiny.pretrain_batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=tiny.pretrain_learning_rate,
        total_steps=steps_per_epoch * tiny.pretrain_epochs,
        pct_start=0.1,
    )
    model.train()
    losses = []
    for epoch in range(tiny.pretrain_epochs):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(order), tiny.pretrain_batch_size):
            batch = [encoded[i] for i in order[start : start + tiny.pretrain_batch_size]]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += loss.item()
        losses.append(total / steps_per_epoch)
        log.info(
            "tiny base pre-training epoch %d/%d: loss %.3f",
            epoch + 1,
            tiny.pretrain_epochs,
            losses[-1],
        )
    model.eval()
    return losses


def build_tiny_base(
    tiny: TinyModelConfig, train_pairs: list[QAPair], cache_dir: str | Path
) -> Path:
    """Folder with the tiny base model and tokenizer, built once per (shape, training text).

    Cached under ``cache_dir/tiny/<key>``; written to a temporary folder and renamed, so
    parallel workers never see half a model.
    """
    from transformers import LlamaForCausalLM

    texts = pretraining_texts(train_pairs)
    target = Path(cache_dir) / "tiny" / tiny_cache_key(tiny, texts)
    if (target / "config.json").is_file():
        return target
    log.info("building the tiny base model in %s (once; cached)", target)
    torch.manual_seed(tiny.seed)
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    model = LlamaForCausalLM(llama_config(tiny, tokenizer))
    losses = pretrain(model, tokenizer, texts, tiny)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".building-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "pretraining.json").write_text(json.dumps({"epoch_losses": losses}))
    try:
        tmp.rename(target)
    except OSError:  # another worker finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
