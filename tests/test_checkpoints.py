"""Checkpoints: which one counts, when they are removed, and the seeded batch order that
lets a resume inside an epoch replay it. Real trials killed (-9) and stopped by SIGTERM,
then resumed by the next run of the sweep: tests/sweep/test_real_sweeps.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from finqa_exp import checkpoints
from finqa_exp.checkpoints import MARKER, STATE_FILE, newest_complete


def write_checkpoint(folder, step, marker=True, state=True):
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    for name in checkpoints.FILES:
        (ckpt / name).write_bytes(b"saved")
    if state:
        (ckpt / STATE_FILE).write_text(json.dumps({"global_step": step, "epoch": step / 10}))
    if marker:
        mark = {"global_step": step, "epoch": step / 10, "trial": 0, "run_id": "r"}
        (ckpt / MARKER).write_text(json.dumps(mark))
    return ckpt


def test_a_half_written_checkpoint_is_ignored_and_the_one_before_it_is_used(tmp_path):
    older = write_checkpoint(tmp_path, 10)
    good = write_checkpoint(tmp_path, 20)
    cut = write_checkpoint(tmp_path, 30, marker=False)  # killed while saving
    no_state = write_checkpoint(tmp_path, 40, state=False, marker=False)
    torn = write_checkpoint(tmp_path, 50)
    (torn / STATE_FILE).write_text('{"global_step": 5')  # a marker, but a torn state file
    half_removed = write_checkpoint(tmp_path, 60)
    (half_removed / "optimizer.pt").unlink()  # a marker, but a file missing
    assert newest_complete(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-20"]
    assert not older.exists() and not cut.exists() and not no_state.exists()


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    write_checkpoint(tmp_path, 30, marker=False)
    assert newest_complete(tmp_path) is None and list(tmp_path.iterdir()) == []


def test_checkpoints_are_kept_only_when_the_trial_is_stopped_from_outside(tmp_path):
    from finqa_exp.sweep.resume import TrialPreempted

    plan = checkpoints.Plan(tmp_path / "trial-0", 0)

    def end_with(err):
        plan.folder.mkdir(exist_ok=True)
        with pytest.raises(type(err)), checkpoints.owned(plan):
            raise err
        return plan.folder.exists()

    assert end_with(TrialPreempted("SIGTERM")) and end_with(KeyboardInterrupt())
    assert not end_with(ValueError("nan loss"))
    import optuna

    assert not end_with(optuna.TrialPruned())
    plan.folder.mkdir()
    with checkpoints.owned(plan):
        pass
    assert not plan.folder.exists()  # complete


def test_each_epochs_order_comes_from_its_own_seed_not_the_global_rng():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(50)]
    sampler = checkpoints.SeededLengthGroupedSampler(4, lengths=lengths, seed=42)
    orders = []
    for epoch in (0, 1, 0):
        torch.manual_seed(epoch + 1000)  # whatever the global RNG holds
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[0] == orders[2] != orders[1]
    assert sorted(orders[1]) == list(range(50))


def test_removal_takes_the_markers_first(tmp_path):
    ckpt = write_checkpoint(tmp_path / "trial-3", 10)
    checkpoints.remove(tmp_path / "trial-3")
    assert not ckpt.exists() and not (tmp_path / "trial-3").exists()
