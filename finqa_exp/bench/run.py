"""Benchmark: our trial and sweep against the seed project's recipe, side by side in one run.

    python -m finqa_exp.bench                 # about 32 minutes on 2 CPU cores
    python -m finqa_exp.bench quick=true      # small sizes, to check it runs (the test)
    python -m finqa_exp.bench 'sections=[train,eval]'

On a CPU it measures the offline tiny model; on a GPU the training, evaluation and memory
rows use a TinyLlama-shaped model initialised at random (no download), 4-bit NF4. Each
pair is measured in this run, one after the other on the same data and model, and every
ratio is computed from those two measurements. Rows this machine cannot measure (the GPU
rows on a CPU) say so. Writes ``${paths.reports_dir}/bench/bench_<cpu|cuda>.md`` and
``.json`` with the machine described. Config: ``conf/bench.yaml``.

Sections: padding (share of padding at 512), train (real tokens/s, ours vs the seed recipe;
GPU: peak memory and MFU), eval (answers/s, batched vs one at a time), sweep (the default
sweep with the pruner on vs off: compute spent, best objective against the objective's noise
between two training seeds, and the per-trial overhead), workers (the idle share of
worker time, 2 workers in batches vs asynchronous), trial (one cold ``python -m
finqa_exp``: the overhead a single run pays), serve (that trial's logged model behind
``mlflow models serve``: start, first and warm answer, generated tokens/s, memory).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from finqa_exp.bench import rows as table
from finqa_exp.config import (
    ConfigError,
    ModelConfig,
    PathsConfig,
    QuantConfig,
    register_configs,
)
from finqa_exp.devices import mixed_precision

log = logging.getLogger(__name__)

SECTIONS = ("padding", "train", "eval", "sweep", "workers", "trial", "serve")
# Small runs for quick=true: they check the benchmark end to end, not the targets.
QUICK = {
    "train_examples": 24,
    "eval_questions": 6,
    "max_new_tokens": 8,
    "sweep_trials": 2,
    "sweep_prefix": 1,
    "sweep_seeds": [0],
    "confirm_top_k": 1,
    "confirm_seeds": [1],
    "serve_questions": 3,
    "workers_trials": 2,
}
QUICK_TRIAL = ["train.epochs=1", "eval.max_questions=4", "eval.max_new_tokens=8"]


@dataclass
class BenchConfig:
    """``conf/bench.yaml``: what to measure, and how much of it."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    quick: bool = False
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    # Training pair: one epoch over this many training examples, ours and the seed's.
    train_examples: int = 160
    # Evaluation pair: greedy answers to this many test questions.
    eval_questions: int = 32
    max_new_tokens: int = 64
    eval_batch_size: int = 16
    # Sweep pair: the default sweep with and without its pruner, for each sampler seed,
    # judged over all its trials and over its first `sweep_prefix` (the default study's 8).
    sweep_trials: int = 16
    sweep_prefix: int = 8
    sweep_seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Each sweep of the pair confirms its top trials as the default study does (top 3, two
    # more seeds): "equal best" is judged on the confirmed means.
    confirm_top_k: int = 3
    confirm_seeds: list[int] = field(default_factory=lambda: [1, 2])
    # Workers pair: the default study (pruner on) on `workers` joblib workers, in batches
    # and asynchronously; each sweep runs `workers_trials` trials.
    workers: int = 2
    workers_trials: int = 8
    # Served champion: this many test questions, one per request (the first is the cold one).
    serve_questions: int = 12
    out_dir: str = "reports/bench"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sections) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"sections: unknown {unknown}; choose from {list(SECTIONS)}")
        for key in ("train_examples", "eval_questions", "max_new_tokens", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.workers < 2 or self.workers_trials < self.workers:
            raise ConfigError(
                f"need workers >= 2 and workers_trials >= workers, got {self.workers} and "
                f"{self.workers_trials}"
            )
        if self.serve_questions < 2:  # the first answer is the cold one; the rest are warm
            raise ConfigError(f"serve_questions must be >= 2, got {self.serve_questions}")
        if self.sweep_trials < 2 or not self.sweep_seeds:
            raise ConfigError("sweep_trials must be >= 2 and sweep_seeds not empty")
        if self.confirm_top_k < 1 or not self.confirm_seeds:
            raise ConfigError(
                f"confirm_top_k must be >= 1 and confirm_seeds not empty, got "
                f"{self.confirm_top_k} and {self.confirm_seeds}"
            )
        if not 1 <= self.sweep_prefix <= self.sweep_trials:
            raise ConfigError(
                f"sweep_prefix must be in [1, sweep_trials={self.sweep_trials}], "
                f"got {self.sweep_prefix}"
            )
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)


register_configs()
ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# ----------------------------------------------------------------------------- running


MODEL_SECTIONS = {"padding", "train", "eval"}


def measure(bc: BenchConfig) -> dict[str, Any]:
    """Run the chosen sections; returns the machine, the raw measurements and the rows."""
    from finqa_exp import devices

    dev = devices.device()  # first: importing transformers and peft starts CUDA
    from finqa_exp import modeling, tiny
    from finqa_exp.bench import measure as m
    from finqa_exp.bench import sweeps
    from finqa_exp.config import DataConfig
    from finqa_exp.data import load_splits

    device = dev.type
    cache = Path(bc.paths.cache_dir)
    results: dict[str, Any] = {"machine": m.machine(dev), "config": asdict(bc), "raw": {}}
    rows: list[dict[str, Any]] = []
    raw = results["raw"]

    if MODEL_SECTIONS & set(bc.sections):
        splits = load_splits(DataConfig())
        if device == "cuda":
            # The GPU rows: TinyLlama's shape, random weights, a BPE tokenizer from our data.
            texts = tiny.pretraining_texts(splits.train)
            tokenizer = tiny.train_tokenizer(texts, m.TINYLLAMA_SHAPE["vocab_size"])
            source = m.random_llama(tokenizer, cache / "bench" / "tinyllama_shape")
            model_name = "TinyLlama shape (random)"
        else:
            source, model_name = sweeps.tiny_setup(cache)[0], "tiny"
        rows += model_rows(bc, dev, source, model_name, splits, raw)
        # The sweeps and the cold trial load their own models: give the memory back first.
        modeling.shared_base.clear()
    if device != "cuda":
        rows.append(
            table.not_measured(
                "training, peak memory and MFU on GPU", "cuda", "TinyLlama shape", ">= 3", "no GPU"
            )
        )
        rows.append(
            table.not_measured("evaluation on GPU", "cuda", "TinyLlama shape", ">= 10", "no GPU")
        )

    sweep_overhead = cold = None
    extra = QUICK_TRIAL if bc.quick else []
    with tempfile.TemporaryDirectory(prefix="finqa-bench-") as tmp:
        root = Path(tmp)
        if "sweep" in bc.sections:
            runs = []
            for seed in bc.sweep_seeds:
                for pruner in (True, False):
                    name = f"bench_seed{seed}_{'pruned' if pruner else 'full'}"
                    log.info("sweep %s: %d trials", name, bc.sweep_trials)
                    confirm = sweeps.confirm_overrides(bc.confirm_top_k, bc.confirm_seeds)
                    runs.append(
                        sweeps.sweep_run(
                            root, cache, name, seed, bc.sweep_trials, pruner, [*confirm, *extra]
                        )
                    )
            raw["sweeps"] = runs
            lengths = sorted({n for n in (bc.sweep_prefix, bc.sweep_trials) if n >= 2})
            raw["seed_noise"], retrained = {}, {}
            for n in lengths:
                cut = [sweeps.first_trials(r, n) for r in runs]
                log.info("the objective's noise: the %d-trial winners, another train.seed", n)
                noise = []
                for r in (r for r in cut if not r["pruner"]):
                    key = (r["seed"], json.dumps(r["best_params"], sort_keys=True))
                    if key not in retrained:  # a winner of both lengths is retrained once
                        retrained[key] = sweeps.seed_noise(root, cache, r, extra)
                    noise.append(retrained[key])
                raw["seed_noise"][str(n)] = noise
                rows += table.sweep_rows(cut, device, noise)
            rows += table.confirmed_rows(runs, device)
            sweep_overhead = sweeps.overhead_of_sweep(next(r for r in runs if not r["pruner"]))
            raw["sweep_overhead"] = sweep_overhead
        if "workers" in bc.sections:
            raw["workers"] = {}
            for schedule in ("batch", "async"):
                log.info("workers: %d, %s, %d trials", bc.workers, schedule, bc.workers_trials)
                raw["workers"][schedule] = sweeps.workers_run(
                    root, cache, schedule, bc.workers_trials, bc.workers, extra
                )
            rows += table.worker_rows(raw["workers"], device)
        if "trial" in bc.sections or "serve" in bc.sections:
            log.info("one cold trial: python -m finqa_exp")
            cold = sweeps.cold_trial(root, cache, extra)
            raw["cold_trial"] = cold
        if "serve" in bc.sections:
            from finqa_exp.bench.serve import served_champion

            log.info("the cold trial's model behind mlflow models serve")
            splits = sweeps.tiny_setup(cache)[1]
            questions = [p.question for p in splits.test[: bc.serve_questions]]
            raw["served"] = served_champion(root, cache, questions)
            rows += table.serve_rows(raw["served"], device, "tiny (served)")
    if "trial" not in bc.sections:
        cold = None
    rows += table.overhead_rows(sweep_overhead, cold, device)
    results["rows"] = rows
    return results


def model_rows(
    bc: BenchConfig, dev: Any, source: Any, model_name: str, splits: Any, raw: dict[str, Any]
) -> list[dict[str, Any]]:
    """The padding, training and evaluation pairs on one loaded base (``source``, 4-bit)."""
    import torch

    from finqa_exp import data as data_lib
    from finqa_exp import modeling
    from finqa_exp.bench import measure as m
    from finqa_exp.config import TrainConfig

    device = dev.type
    template = "### Question: {question}\n\n### Answer: "
    rows: list[dict[str, Any]] = []
    tokenizer, base, _ = modeling.shared_base.get(source, ModelConfig(), QuantConfig(), dev)
    key = f"bench-{source}"
    train_ds = data_lib.tokenize(tokenizer, template, splits.train, 512, f"train-{key}")

    if "padding" in bc.sections:
        lengths = [len(x) for x in train_ds["input_ids"]]
        mean_len = sum(lengths) / len(lengths)
        share = m.padding_share(lengths, m.SEED_MAX_LENGTH)
        raw["padding_share"] = share
        rows.append(
            table.row(
                "padding share of the training data at max length 512",
                device,
                model_name,
                "share",
                None,
                None,
                share,
                "report",
                None,
                f"{len(train_ds)} examples, {mean_len:.0f} tokens on average",
            )
        )
    if "train" in bc.sections:
        subset = train_ds.select(range(min(bc.train_examples, len(train_ds))))
        log.info("training pair: %d examples, ours then the seed recipe", len(subset))
        pair = m.training_pair(base, tokenizer, subset, dev)
        flags = mixed_precision(TrainConfig(), dev)
        pair["precision"] = "bf16" if flags["bf16"] else "fp16" if flags["fp16"] else "fp32"
        if device == "cuda":
            peak = m.bf16_peak_flops(dev)
            params = m.count_params(base)
            pair["mfu"] = {
                "peak_tflops": peak / 1e12,
                "params": params,
                **{
                    side: pair[side]["real_tokens_per_s"] * 4 * params / peak
                    for side in ("ours", "seed")
                },
            }
        raw["train"] = pair
        rows += table.training_rows(pair, device, model_name)
    if "eval" in bc.sections:
        questions = [p.question for p in splits.test[: bc.eval_questions]]
        log.info("evaluation pair: %d questions, batched then one at a time", len(questions))
        torch.manual_seed(0)
        model = modeling.add_lora(base, m.SEED_LORA, gradient_checkpointing=False)
        pair = m.eval_pair(
            model, tokenizer, template, questions, bc.max_new_tokens, bc.eval_batch_size, dev
        )
        modeling.remove_lora(model)
        raw["eval"] = pair
        rows += table.eval_rows(pair, device, model_name)
    return rows


# ----------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def to_markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        f"# finqa-exp benchmark ({machine['device']})",
        "",
        "Each ratio comes from two measurements taken one after the other in this run.",
        "",
        "| measurement | device | model | ours | baseline | value | target | met | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        cells = [r["measurement"], r["device"], r["model"], _fmt(r["ours"]), _fmt(r["baseline"])]
        cells += [_fmt(r["value"]), r["target"], met, r["note"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if results["machine"]["device"].startswith("cuda") else "cpu"
    md, js = out_dir / f"bench_{device}.md", out_dir / f"bench_{device}.json"
    md.write_text(to_markdown(results), encoding="utf-8")
    js.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return md, js
