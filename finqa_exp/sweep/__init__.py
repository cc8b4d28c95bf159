"""The `finqa_optuna` Hydra sweeper: an Optuna study run through any Hydra launcher.

    python -m finqa_exp -m                                   # this project's default study
    python tests/toy_app/app.py -m hydra.sweeper.n_trials=6  # any Hydra app

A generic sweeper: it imports nothing else of finqa_exp; what is app-specific (the MLflow
study run, the preflight check) comes in through its config (``callbacks``,
``preflight``). ``sweeper`` runs the study (ask, launch, tell); ``launches`` keeps
``n_jobs`` trial jobs in flight through the Hydra launcher; ``job`` is a trial's side of
it (its Optuna trial through :func:`current_trial`, the heartbeat); ``resume`` what a job
needs to survive its process (SIGTERM as preemption, its retry chain, its checkpoint
folder); ``study_book`` decides which trials fill the study's slots across re-runs and
workers; ``study_setup`` builds storages and samplers; ``search_space`` reads Hydra's
sweep grammar. Hydra finds the plugin through hydra_plugins/finqa_optuna_sweeper.
"""

from finqa_exp.sweep.job import current_trial

__all__ = ["current_trial"]
