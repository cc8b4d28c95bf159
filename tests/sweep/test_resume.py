"""SIGTERM as preemption, and a trial's retry chain (finqa_exp/sweep/resume.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import optuna
import pytest

from finqa_exp.sweep import resume
from finqa_exp.sweep.resume import TrialPreempted, deferred, requested, sigterm_preempts
from finqa_exp.sweep.study_book import enqueue_retry, fail_trial


def sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_a_job_at_once_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrialPreempted, match="SIGTERM"), sigterm_preempts():
        sigterm()
        time.sleep(10)  # interrupted: the handler raises first
        pytest.fail("SIGTERM did not stop the job")
    assert signal.getsignal(signal.SIGTERM) is before and requested()


def test_deferred_code_is_asked_to_stop_and_stops_itself():
    with sigterm_preempts():
        assert not requested()  # cleared when a handler is installed
        with pytest.raises(TrialPreempted, match="saved"), deferred():
            sigterm()
            assert requested()  # the flag only: the code saves, then stops itself
            raise TrialPreempted("saved at step 5")
        # Deferred code that returns before it could stop is stopped on its way out.
        with pytest.raises(TrialPreempted, match="told to stop"), deferred():
            pass


def test_a_job_inside_a_deferred_sweep_stops_at_once_and_the_sweep_only_later():
    # The sweep process waiting on its jobs; it is stopped on leaving its loop at the latest.
    with pytest.raises(TrialPreempted, match="told to stop"), sigterm_preempts(), deferred():
        with pytest.raises(TrialPreempted), sigterm_preempts():  # an in-process job
            sigterm()
            time.sleep(10)
            pytest.fail("SIGTERM did not stop the job")
        sigterm()  # between jobs: only flagged (never between a job's end and its tell)
        assert requested()


def test_outside_the_main_thread_nothing_is_installed():
    seen = []

    def job():
        with sigterm_preempts(), deferred():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=job)
    thread.start()
    thread.join()
    assert seen == [before]


def test_a_retry_knows_its_chain_and_a_confirmation_is_not_retried(tmp_path):
    from finqa_exp.sweep.confirm import CONFIRMED_STUDY_ATTR

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.log"))
    )
    study = optuna.create_study(study_name="chain", storage=storage)
    first = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    chain = resume.retry_chain(first)
    assert (chain.root, chain.attempts, chain.retried) == (first.number, (), True)
    for _ in range(2):  # killed twice
        enqueue_retry(study, fail_trial(study, study.trials[-1].number, "stale"), max_retry=2)
        retry = study.ask()
    chain = resume.retry_chain(retry)
    assert (chain.root, chain.attempts, retry.number) == (0, (0, 1), 2)
    assert resume.attempt(study, 1).params == first.params

    memory = optuna.create_study()
    assert not resume.retry_chain(memory.ask()).retried  # dies with its process
    confirm = optuna.create_study(study_name="chain.confirm", storage=storage)
    confirm.set_user_attr(CONFIRMED_STUDY_ATTR, "chain")
    assert not resume.retry_chain(confirm.ask()).retried  # a new pair runs instead


def test_discard_removes_a_recorded_checkpoint_folder(tmp_path):
    study = optuna.create_study(
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "s.log"))
        )
    )
    trial = study.ask()
    folder = tmp_path / "ckpt"
    (folder / "checkpoint-3").mkdir(parents=True)
    resume.record_checkpoint(trial, folder)
    frozen = fail_trial(study, trial.number, "lost for good")
    resume.discard_checkpoint(frozen)
    assert not folder.exists()
