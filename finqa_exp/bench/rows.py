"""The benchmark's table: one row per measurement, each ratio computed from the two
measurements of its pair and judged against its target (``met`` is None where the target
is only to report). Pure functions of what finqa_exp.bench.measure returned."""

from __future__ import annotations

import math
import statistics
from typing import Any


def ratio(ours: float | None, baseline: float | None) -> float | None:
    """``ours / baseline``, or None when either was not measured."""
    if ours is None or baseline is None or baseline == 0:
        return None
    return ours / baseline


def row(
    name: str,
    device: str,
    model: str,
    unit: str,
    ours: float | None,
    baseline: float | None,
    value: float | None,
    target: str,
    met: bool | None,
    note: str = "",
) -> dict[str, Any]:
    """One line of the table. ``value`` is the figure judged against ``target``."""
    return {
        "measurement": name,
        "device": device,
        "model": model,
        "unit": unit,
        "ours": ours,
        "baseline": baseline,
        "value": value,
        "target": target,
        "met": met,
        "note": note,
    }


def not_measured(name: str, device: str, model: str, target: str, why: str) -> dict[str, Any]:
    return row(name, device, model, "", None, None, None, target, None, f"not measured: {why}")


def training_rows(pair: dict[str, Any], device: str, model: str) -> list[dict[str, Any]]:
    ours, seed = pair["ours"], pair["seed"]
    speedup = ratio(ours["real_tokens_per_s"], seed["real_tokens_per_s"])
    rows = [
        row(
            "training: real tokens/s, ours vs seed recipe (x)",
            device,
            model,
            "tokens/s",
            ours["real_tokens_per_s"],
            seed["real_tokens_per_s"],
            speedup,
            ">= 3",
            speedup is not None and speedup >= 3,
            f"{pair['examples']} examples, 1 epoch each, {ours['real_tokens']} real tokens; "
            f"both in {pair.get('precision', 'fp32')}",
        )
    ]
    if seed["peak_memory_mb"] is not None:
        for kind, what in (
            ("allocated", "PyTorch's peak allocated"),
            ("reserved", "PyTorch's peak reserved (nvidia-smi adds the CUDA context)"),
        ):
            rows.append(
                row(
                    f"peak GPU memory ({kind}): seed workload (batch 8 x 512, r=16) vs ours (MiB)",
                    device,
                    model,
                    "MiB",
                    ours["peak_memory_mb"][kind],
                    seed["peak_memory_mb"][kind],
                    seed["peak_memory_mb"][kind],
                    "report (seed project: ~12 GB in nvidia-smi)",
                    None,
                    what,
                )
            )
    if "mfu" in pair:
        rows.append(
            row(
                "MFU: 4 x params FLOPs per real token / measured bf16 peak",
                device,
                model,
                "share",
                pair["mfu"]["ours"],
                pair["mfu"]["seed"],
                pair["mfu"]["ours"],
                "report",
                None,
                f"peak {pair['mfu']['peak_tflops']:.0f} TFLOP/s measured",
            )
        )
    return rows


def eval_rows(pair: dict[str, Any], device: str, model: str) -> list[dict[str, Any]]:
    speedup = ratio(pair["batched"]["answers_per_s"], pair["single"]["answers_per_s"])
    on_gpu = device == "cuda"
    return [
        row(
            f"evaluation: answers/s, batched ({pair['batch_size']}) vs one at a time (x)",
            device,
            model,
            "answers/s",
            pair["batched"]["answers_per_s"],
            pair["single"]["answers_per_s"],
            speedup,
            ">= 10 (GPU)" if on_gpu else "report (target is for GPU)",
            (speedup is not None and speedup >= 10) if on_gpu else None,
            f"{pair['questions']} questions, up to {pair['max_new_tokens']} new tokens; "
            f"{pair['same_answers']:.0%} identical answers",
        )
    ]


def sweep_rows(
    runs: list[dict[str, Any]], device: str, noise: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Pruning's saving, and the best objective each way per seed.

    Trial compute is the trials' training and tuned-model generation seconds: the work a
    pruner can stop. Their wall seconds, which add each trial's fixed costs (the first trial's
    imports and base load, MLflow), are reported beside it; those costs are the overhead
    rows' business.

    "Equal best" is judged against the objective's own noise between two seeds: each
    unpruned sweep's best params trained again with another train.seed (``noise``). The
    spread of the best over the sampler seeds is reported too; with two sweeps it mostly
    shows which params each seed happened to sample.
    """
    on = [r for r in runs if r["pruner"]]
    off = [r for r in runs if not r["pruner"]]
    spent_on = sum(r["compute_seconds"] for r in on)
    spent_off = sum(r["compute_seconds"] for r in off)
    saving = 1 - spent_on / spent_off
    wall_on = sum(r["trial_seconds"] for r in on)
    wall_off = sum(r["trial_seconds"] for r in off)
    best_on = [r["best"] for r in on]
    best_off = [r["best"] for r in off]
    spread = max(best_off) - min(best_off) if len(best_off) > 1 else None
    seed_noise = max(n["noise"] for n in noise) if noise else None
    gap = max(abs(a - b) for a, b in zip(best_on, best_off))
    seeds = [r["seed"] for r in on]
    notes = []
    if seed_noise is not None:
        notes.append(
            "noise: the unpruned winners trained with train.seed "
            + " and ".join(f"{n['train_seed']} ({n['value_other_seed']:.4f} vs {n['value']:.4f})"
                           for n in noise)
        )  # fmt: skip
    if spread is not None:
        notes.append(f"spread of the unpruned best over sampler seeds {spread:.4f}")
    n_trials = on[0]["n_trials"]
    return [
        row(
            f"sweep of {n_trials} trials: trial compute saved by pruning",
            device,
            "tiny",
            "s",
            spent_on,
            spent_off,
            saving,
            ">= 0.40",
            saving >= 0.40,
            f"seeds {seeds}, {n_trials} trials each; training + tuned answers, seconds summed",
        ),
        row(
            f"sweep of {n_trials} trials: trial wall time saved by pruning",
            device,
            "tiny",
            "s",
            wall_on,
            wall_off,
            1 - wall_on / wall_off,
            "report",
            None,
            "trial wall seconds summed: compute plus each trial's fixed costs",
        ),
        row(
            f"sweep of {n_trials} trials: best ROUGE-L, pruner on vs off (largest gap over seeds)",
            device,
            "tiny",
            "rougeL",
            sum(best_on) / len(best_on),
            sum(best_off) / len(best_off),
            gap,
            "<= noise of two seeds" + (f" ({seed_noise:.4f})" if seed_noise is not None else ""),
            (gap <= seed_noise) if seed_noise is not None else None,
            "; ".join(notes) or "no noise measured",
        ),
    ]


def confirmed_rows(runs: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The pruner judged on confirmed means: each sweep's winner is its best mean over seeds
    (finqa_exp/sweep/confirm.py), and the pruned sweep's is "equal" when the gap is within
    the 95 % half-width of a difference of two such means (1.96 x sd x sqrt(2 / seeds), sd
    pooled over every confirmed configuration of both sweeps). Also: how often the pruner
    stopped the configuration the unpruned sweep confirms as best."""
    pairs = [
        (on, next(r for r in runs if not r["pruner"] and r["seed"] == on["seed"]))
        for on in runs
        if on["pruner"]
    ]
    pairs = [(on, off) for on, off in pairs if on["confirmed"] and off["confirmed"]]
    if not pairs:
        return []
    configs = [c for on, off in pairs for c in (*on["confirmed"], *off["confirmed"])]
    variances = [statistics.variance(c["values"]) for c in configs if len(c["values"]) > 1]
    n_seeds = min(len(c["values"]) for c in configs)
    sd = math.sqrt(statistics.fmean(variances)) if variances else None
    half = 1.96 * sd * math.sqrt(2 / n_seeds) if sd is not None else None
    means_on = [on["confirmed"][0]["mean"] for on, _ in pairs]
    means_off = [off["confirmed"][0]["mean"] for _, off in pairs]
    gap = max(abs(a - b) for a, b in zip(means_on, means_off))
    fates = [(on["seed"], stopped(on, off["confirmed"][0]["params"])) for on, off in pairs]
    n_stopped = sum(fate.startswith("pruned") for _, fate in fates)
    n_trials = pairs[0][0]["n_trials"]
    sd_note = f"seed sd {sd:.4f} pooled over {len(variances)} configurations" if sd else "no sd"
    return [
        row(
            f"sweep of {n_trials} trials: confirmed best ROUGE-L (mean of {n_seeds} seeds), "
            "pruner on vs off (largest gap over seeds)",
            device,
            "tiny",
            "rougeL",
            statistics.fmean(means_on),
            statistics.fmean(means_off),
            gap,
            "<= 95 % half-width of a difference of means"
            + (f" ({half:.4f})" if half is not None else ""),
            (gap <= half) if half is not None else None,
            f"sampler seeds {[on['seed'] for on, _ in pairs]}; winners "
            + "; ".join(
                f"trial {on['confirmed'][0]['number']} {on['confirmed'][0]['mean']:.4f} vs trial "
                f"{off['confirmed'][0]['number']} {off['confirmed'][0]['mean']:.4f}"
                for on, off in pairs
            )
            + f"; {sd_note}",
        ),
        row(
            f"sweep of {n_trials} trials: pruner stopped the unpruned sweep's confirmed best",
            device,
            "tiny",
            "share",
            None,
            None,
            n_stopped / len(pairs),
            "report",
            None,
            "; ".join(f"seed {seed}: {fate}" for seed, fate in fates),
        ),
    ]


def stopped(run: dict[str, Any], params: dict[str, Any]) -> str:
    """What the sweep ``run`` did with ``params``: "pruned" (trial n), "completed", or
    "not sampled" (its sampler never proposed them)."""
    same = [t for t in run["trials"] if t.get("params") == params]
    if not same:
        return "not sampled"
    if any(t["state"] == "PRUNED" for t in same):
        return f"pruned (trial {next(t['number'] for t in same if t['state'] == 'PRUNED')})"
    return "completed" if any(t["state"] == "COMPLETE" for t in same) else same[0]["state"]


def overhead_rows(
    sweep_overhead: dict[str, Any] | None, cold: dict[str, Any] | None, device: str
) -> list[dict[str, Any]]:
    rows = []
    if sweep_overhead is not None:
        later = sweep_overhead["later_trials_median"]
        rows.append(
            row(
                "overhead: share of a sweep trial outside training and generation",
                device,
                "tiny",
                "share",
                later,
                None,
                later,
                "<= 0.05",
                later is not None and later <= 0.05,
                f"median of trials 1..n (base reused); trial 0 (loads the base): "
                f"{sweep_overhead['first_trial']:.3f}; whole sweep command incl. startup: "
                f"{sweep_overhead['whole_command']:.3f}",
            )
        )
    if cold is not None:
        rows.append(
            row(
                "overhead: one cold `python -m finqa_exp` (process start, imports, loading)",
                device,
                "tiny",
                "share",
                cold["overhead_share_of_command"],
                None,
                cold["overhead_share_of_command"],
                "report",
                None,
                f"command {cold['command_seconds']:.1f} s, training + generation "
                f"{cold['work_seconds']:.1f} s; inside the trial function "
                f"{cold['overhead_share_in_trial']:.3f}",
            )
        )
    return rows


def worker_rows(runs: dict[str, dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Idle worker time, batched rounds against asynchronous trials (bench/sweeps.py)."""
    if not runs:
        return []
    batch, fast = runs["batch"], runs["async"]
    slots = fast["slots"]

    def fates(r: dict[str, Any]) -> str:
        return ", ".join(f"{n} {s.lower()}" for s, n in r["states"].items() if n)

    return [
        row(f"idle share of worker time, {slots} workers, default study with pruning", device,
            "tiny", "share", fast["idle_share"], batch["idle_share"],
            fast["idle_share"] - batch["idle_share"], "async < batch",
            fast["idle_share"] < batch["idle_share"],
            f"ours: async ({fates(fast)}); baseline: batches of {slots} ({fates(batch)}); "
            "value: the difference"),
        row(f"sweep wall time, {slots} workers (s)", device, "tiny", "s", fast["wall_s"],
            batch["wall_s"], ratio(fast["wall_s"], batch["wall_s"]), "report", None,
            "first trial start to last trial end; the samplers see different trials, so "
            "the two sweeps' trials differ"),
    ]  # fmt: skip


SEED_SERVING = {  # what the seed project reported for its chat app
    "first": "about 2-3 s a response", "tokens": "50-60 on CPU, 150-200 on GPU",
    "memory": "about 4 GB (TinyLlama 1.1B)",
}  # fmt: skip


def serve_rows(s: dict[str, Any] | None, device: str, model: str) -> list[dict[str, Any]]:
    """The served champion (finqa_exp/bench/serve.py): figures to report beside the seed's."""
    if s is None:
        return []
    n = s["warm_answers"]
    mem, mem_note = (s["gpu_mb"], "GPU memory (nvidia-smi)") if s.get("gpu_mb") else (
        s["peak_rss_mb"], "peak resident memory of the scoring process (uvicorn)")  # fmt: skip
    return [
        row("served champion: server start, model load included (s)", device, model, "s",
            s["start_seconds"], None, s["start_seconds"], "report", None,
            "mlflow models serve --env-manager local, until /ping answers"),
        row("served champion: first answer (s)", device, model, "s", s["first_answer_seconds"],
            None, s["first_answer_seconds"], "report", None,
            f"one question per POST /invocations; seed: {SEED_SERVING['first']}"),
        row("served champion: warm answer (s)", device, model, "s",
            s["warm_seconds_per_answer"], None, s["warm_seconds_per_answer"], "report", None,
            f"mean of {n} requests, greedy, up to the trial's max_new_tokens"),
        row("served champion: generated tokens/s", device, model, "tokens/s",
            s["generated_tokens_per_s"], None, s["generated_tokens_per_s"], "report", None,
            f"answer tokens over warm request time; seed: {SEED_SERVING['tokens']}"),
        row("served champion: memory (MB)", device, model, "MB", mem, None, mem, "report", None,
            f"{mem_note}; seed: {SEED_SERVING['memory']}"),
    ]  # fmt: skip
