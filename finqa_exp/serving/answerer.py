"""Load a tuned model (base + LoRA adapter) from a logged model's parts, and answer.

One loading path for every way of asking: the pyfunc model (``mlflow models serve``,
``mlflow.pyfunc.load_model``), ``python -m finqa_exp.ask`` and ``python -m finqa_exp.app``.
So the same question gets the same greedy answer from each.

    from finqa_exp.serving import answerer
    tuned = answerer.load({"adapter": "/abs/adapter", "base": "/abs/tiny"}, settings)
    tuned.answer(["What is EBITDA?"])
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finqa_exp.config import QuantConfig
from finqa_exp.serving.spec import ADAPTER, BASE, ServeSettings, SpecError

log = logging.getLogger(__name__)


@dataclass
class Answerer:
    """A loaded tuned model, its tokenizer and settings; ``note`` says how it was loaded."""

    model: Any  # peft.PeftModel
    tokenizer: Any
    settings: ServeSettings
    note: str

    def answer(self, questions: Sequence[str], max_new_tokens: int | None = None) -> list[str]:
        """Greedy answers with the trial's prompt template, length and batch size."""
        from finqa_exp.evaluation import generate_answers

        s = self.settings
        return generate_answers(
            self.model, self.tokenizer, s.prompt_template, list(questions),
            max_new_tokens or s.max_new_tokens, s.batch_size,
        )  # fmt: skip


def load_quant(quant: QuantConfig, device_type: str, has_bnb: bool) -> tuple[QuantConfig, str]:
    """The trial's quantization where this machine allows it, and what was used: 4-bit
    needs bitsandbytes and a CUDA device or the CPU (its CPU kernel); elsewhere the base
    loads unquantized in the compute dtype."""
    if not quant.load_in_4bit:
        return quant, "not quantized, as trained"
    if has_bnb and device_type in ("cuda", "cpu"):
        return quant, f"4-bit {quant.quant_type.upper()}, as trained"
    plain = QuantConfig(name="none", load_in_4bit=False, compute_dtype=quant.compute_dtype)
    why = "bitsandbytes is not installed" if not has_bnb else f"no 4-bit on {device_type}"
    return plain, f"not quantized ({why}; trained 4-bit {quant.quant_type.upper()})"


def base_source(artifacts: Mapping[str, str], settings: ServeSettings) -> str:
    """Where the base is: the model's own copy, a hub id, or a folder that must exist."""
    if settings.base_kind == "bundled":
        if BASE not in artifacts:
            raise SpecError("the model's settings say its base is bundled, but it has none")
        return artifacts[BASE]
    if settings.base is None:
        raise SpecError(f"the model's settings name no base ({settings.base_kind})")
    if settings.base_kind == "local" and not Path(settings.base).is_dir():
        raise SpecError(f"the base model folder {settings.base} is not on this machine")
    return settings.base


def load(artifacts: Mapping[str, str], settings: ServeSettings, quantize: bool = True) -> Answerer:
    """Base as the trial loaded it (``quantize=False``: unquantized, for merging), plus the
    adapter, on this process's device; prints one line saying what was loaded."""
    from finqa_exp import devices

    dev = devices.device()  # first: importing peft (and bitsandbytes) starts CUDA
    import peft

    from finqa_exp import modeling

    source = base_source(artifacts, settings)
    model_cfg = settings.model_config(source)
    tokenizer = modeling.load_tokenizer(artifacts[ADAPTER], model_cfg)
    if settings.base_kind != "hub":  # a rebuilt or copied base must speak the adapter's words
        check_vocab(modeling.load_tokenizer(source, model_cfg), tokenizer)
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    quant, how = load_quant(settings.quant, dev.type, has_bnb)
    if not quantize:
        quant = QuantConfig(name="none", load_in_4bit=False, compute_dtype=quant.compute_dtype)
        how = "not quantized, to merge"
    base = modeling.load_base_model(source, model_cfg, quant, dev)
    model = peft.PeftModel.from_pretrained(base, artifacts[ADAPTER])
    model.eval()
    where = f"hub {source}@{settings.revision}" if settings.base_kind == "hub" else source
    note = f"base {where}, {how}, on {devices.describe_device(dev)}"
    print(f"finqa-exp: {note}", file=sys.stderr)
    return Answerer(model, tokenizer, settings, note)


def check_vocab(base: Any, adapter: Any) -> None:
    if base.get_vocab() != adapter.get_vocab():
        raise SpecError(
            "the base model's tokenizer differs from the one the adapter was trained with "
            "(a different data split or model.tiny settings?)"
        )
