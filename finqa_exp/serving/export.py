"""Write a tuned model to a folder, ready for the hub: the adapter (default) or the merged
model, with a model card (finqa_exp/serving/card.py)::

    python -m finqa_exp.ask --export /abs/finqa-adapter
    python -m finqa_exp.ask --export /abs/finqa-merged --merged

An adapter export loads with peft (``PeftModel.from_pretrained(base, DIR)``); a tiny base
travels with it in ``base/`` (``AutoModelForCausalLM.from_pretrained(DIR,
subfolder="base")``). A merged export is a plain ``AutoModelForCausalLM`` folder. Weights
are safetensors either way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from finqa_exp.serving import answerer
from finqa_exp.serving.card import CardFacts, model_card
from finqa_exp.serving.spec import ADAPTER, BASE, ServeSettings, SpecError

EXPORT_INFO = "finqa_export.json"
CARD = "README.md"


def check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SpecError(f"export folder {target} is not empty")


def export(
    artifacts: Mapping[str, str], settings: ServeSettings, facts: CardFacts, target: Path
) -> Path:
    """The adapter or (``facts.merged``) the merged model in ``target``, with its card and
    ``finqa_export.json`` (how to prompt it)."""
    check_target(target)
    if facts.merged:
        tuned = answerer.load(artifacts, settings, quantize=False)  # merging wants full weights
        merged = tuned.model.merge_and_unload()
        merged.config.use_cache = True  # training turned it off; serving wants it
        target.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(target)  # safetensors
        tuned.tokenizer.save_pretrained(target)
    else:
        shutil.copytree(artifacts[ADAPTER], target, dirs_exist_ok=True)
        if BASE in artifacts:
            shutil.copytree(artifacts[BASE], target / BASE)
            # Relative, as the folder may be uploaded: load the base with subfolder="base".
            _point_adapter_at(target, BASE, None)
        elif settings.base_kind == "hub":
            _point_adapter_at(target, settings.base or "", settings.revision)
    info = {
        "run_id": facts.run_id,
        "source": facts.label,
        "merged": facts.merged,
        "base_model": settings.base or "bundled (base/)",
        "base_revision": settings.revision,
        "prompt_template": settings.prompt_template,
        "max_new_tokens": settings.max_new_tokens,
    }
    (target / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    (target / CARD).write_text(model_card(facts))
    return target


def _point_adapter_at(target: Path, base: str, revision: str | None) -> None:
    """peft's AutoPeftModelForCausalLM finds the base (and its commit) through
    adapter_config.json."""
    path = target / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    if revision:
        config["revision"] = revision
    path.write_text(json.dumps(config, indent=2) + "\n")
