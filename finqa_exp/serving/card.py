"""The model card of an exported model (``python -m finqa_exp.ask --export DIR``): the
Hugging Face hub's README.md, with YAML metadata and the figures of the run it came from.

Pure: everything comes in as arguments (the run's config, metrics and tags, the registry
version's tags), so a card can be checked against the run it describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finqa_exp.config import FinqaConfig
from finqa_exp.corpus import SEED_PROMPT
from finqa_exp.metrics import ROUGE_KEYS
from finqa_exp.serving.spec import base_kind
from finqa_exp.tracking import names


@dataclass(frozen=True)
class CardFacts:
    """What a card says: the run's config and records, and how it was exported."""

    conf: FinqaConfig
    run_id: str
    metrics: dict[str, float]
    run_tags: dict[str, str]
    version_tags: dict[str, str] = field(default_factory=dict)  # the champion's, if one
    label: str = ""  # "<model> version <n> (champion), run <id>"
    merged: bool = False
    base_revision: str | None = None
    license: str | None = None


def base_name(conf: FinqaConfig) -> str:
    return conf.model.name_or_path or f"finqa-exp tiny Llama ({conf.model.name}, in base/)"


def license_id(facts: CardFacts) -> str:
    """The card's licence: as asked, else ours for the tiny model (built by finqa-exp from
    our data), else "other": a hub base's licence binds its fine-tunes; say it with
    --license (llama2 for Llama-2)."""
    if facts.license:
        return facts.license
    return "apache-2.0" if not facts.conf.model.name_or_path else "other"


def metadata(facts: CardFacts) -> str:
    conf = facts.conf
    lines = ["---", f"license: {license_id(facts)}"]
    if base_kind(conf.model.name_or_path) == "hub":  # the hub checks it names a hub model
        lines.append(f"base_model: {conf.model.name_or_path}")
    if not facts.merged:
        lines.append("library_name: peft")
    lines += ["pipeline_tag: text-generation", "tags:", "- finance", "- lora", "- finqa-exp"]
    if conf.data.source == "hub" and conf.data.path:
        lines += ["datasets:", f"- {conf.data.path}"]
    lines.append("---")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def scores_table(metrics: dict[str, float]) -> str:
    """ROUGE of base and tuned in the seed projects' form (a text model: perplexity)."""
    keys = (names.PERPLEXITY,) if names.PERPLEXITY in metrics else ROUGE_KEYS
    head = "| model | " + " | ".join(k.replace("rouge", "ROUGE-") for k in keys) + " |"
    rows = [head, "|---" * (len(keys) + 1) + "|"]
    for label, prefix in (("base", "base_"), ("fine-tuned", "")):
        cells = [_fmt(metrics.get(prefix + k)) for k in keys]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def hyperparameters(conf: FinqaConfig) -> str:
    t, lora = conf.train, conf.lora
    rows = [
        ("LoRA rank r", lora.r), ("LoRA alpha", lora.alpha), ("LoRA dropout", lora.dropout),
        ("target modules", ", ".join(lora.target_modules)),
        ("quantization", "4-bit " + conf.quant.quant_type.upper()
         if conf.quant.load_in_4bit else "none"),
        ("learning rate", f"{t.learning_rate:.3g}"), ("batch size", t.batch_size),
        ("gradient accumulation", t.gradient_accumulation_steps), ("epochs", t.epochs),
        ("warmup steps", t.warmup_steps), ("schedule", t.scheduler), ("seed", t.seed),
        ("max length", conf.data.max_length),
    ]  # fmt: skip
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def confirmed_line(tags: dict[str, str], metric: str) -> str | None:
    if "objective_mean" not in tags:
        return None
    return (
        f"Confirmed over {tags.get('n_seeds', '?')} training seeds: {metric} mean "
        f"{float(tags['objective_mean']):.4f} (sd {float(tags['objective_std']):.4f}; values "
        f"{tags.get('objective_values', '')})."
    )


def usage(facts: CardFacts) -> str:
    template = facts.conf.data.prompt_template.replace("\n", "\\n")
    text = facts.conf.data.format == "text"
    example = SEED_PROMPT if text else "What is EBITDA?"
    if facts.merged:
        load = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
        )
    else:
        if facts.conf.model.name_or_path:
            rev = f', revision="{facts.base_revision}"' if facts.base_revision else ""
            base = f'"{facts.conf.model.name_or_path}"{rev}'
        else:  # the tiny base travels in the export's base/ folder
            base = '"PATH_OR_REPO", subfolder="base"'
        load = (
            "from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"base = AutoModelForCausalLM.from_pretrained({base})\n"
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")'
        )
    return (
        f"```python\n{load}\n"
        f'prompt = "{template}".format(question="{example}")\n'
        "ids = tokenizer(prompt, return_tensors='pt')\n"
        f"out = model.generate(**ids, max_new_tokens={facts.conf.eval.max_new_tokens}, "
        "do_sample=False)\n"
        "print(tokenizer.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True))"
        "\n```"
    )


def model_card(facts: CardFacts) -> str:
    conf, m = facts.conf, facts.metrics
    kind = "merged model (base + LoRA folded in)" if facts.merged else "LoRA adapter"
    study = facts.run_tags.get("study")
    origin = f"MLflow run `{facts.run_id}`"
    if study:
        origin += f", trial {facts.run_tags.get('trial_number', '?')} of the Optuna study `{study}`"
    rev = f" at revision `{facts.base_revision}`" if facts.base_revision else ""
    text = conf.data.format == "text"
    task = "financial text (domain adaptation)" if text else "financial question answering"
    unit = f"training blocks of {conf.data.max_length} tokens" if text else "training pairs"
    held_out = "held-out documents (perplexity, lower is better)" if text else (
        "held-out questions (greedy answers)"
    )  # fmt: skip
    parts = [
        metadata(facts),
        f"# {conf.model.name} fine-tuned for {'financial text' if text else 'financial Q&A'}"
        f" ({kind})",
        f"A {kind} for {task}, found by "
        f"[finqa-exp](https://github.com/finqa-exp/finqa-exp): {origin}"
        + (f" ({facts.label})" if facts.label else "")
        + ".",
        f"- **Base model:** {base_name(conf)}{rev}",
        f"- **Data:** {conf.data.name} ({conf.data.source}"
        + (f": {conf.data.path}" if conf.data.path else "")
        + f"), "
        f"{int(m.get('train_examples', 0))} {unit}, held-out test split "
        f"(data.seed {conf.data.seed})",
        f"- **Prompt:** `{conf.data.prompt_template!r}`",
        f"## Scores on the {held_out}",
        scores_table(m),
    ]
    objective = conf.objective.metrics[0]
    line = confirmed_line(facts.version_tags, objective)
    if line:
        parts.append(line)
    if "numeric_accuracy" in m:
        parts.append(
            f"Numeric accuracy: base {_fmt(m.get('base_numeric_accuracy'))}, fine-tuned "
            f"{_fmt(m['numeric_accuracy'])}."
        )
    parts += ["## Training", hyperparameters(conf)]
    searched = facts.version_tags.get(names.SEARCHED_TAG)
    if searched:
        parts.append(f"Searched by the study, this trial's values: {searched}.")
    parts += ["## Use", usage(facts)]
    parts += [
        "## Licence",
        f"`{license_id(facts)}`. A fine-tune of a hub model is bound by that model's "
        "licence; the data's terms apply to what it learned.",
    ]
    return "\n\n".join(parts) + "\n"
