"""The names a trial's records go under, defined once.

A trial writes them (finqa_exp/trial.py, through tracking.TrialRun); the study's parent run
(tracking.study_run), the report, ``ask``, the champion's registration and the bench read
them. A writer and its readers import the same constant, so they cannot drift apart.
"""

# Optuna user attributes.
RUN_ID_ATTR = "mlflow_run_id"  # of a trial: its MLflow run
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # of a study: its parent MLflow run
TIMINGS_ATTR = "timings"  # of a trial: time_<phase>_s, trial_time_s, overhead_share
STEP_UNIT_ATTR = "step_unit"  # of a trial: the unit of its intermediate values' steps
# Of a trial: what its intermediate values are ("-eval_loss": negated, so that higher is
# better as in a maximized study). They are the pruner's signal; a pruned trial has no value.
INTERMEDIATE_VALUE_ATTR = "intermediate_value"

# MLflow tags.
STATE_TAG = "optuna_state"  # of a trial's run: how the trial ended (a state below)
ERROR_TAG = "error"  # of a failed or pruned trial's run: the exception, one line
STUDY_TAG = "study"  # the study's name, on its parent run and every trial's run
TRIAL_NUMBER_TAG = "trial_number"
ROLE_TAG = "optuna_role"  # "study" on a study's parent run
PEAK_MEMORY_KIND_TAG = "peak_memory_kind"  # what peak_memory_mb measured
# Of a text trial's run: the scores it did not compute, and why (no reference answers).
SCORES_SKIPPED_TAG = "scores_skipped"
MODEL_TAG, DATA_TAG, EXPERIMENT_TAG = "model", "data", "experiment"  # config names
# Of a confirmation run (finqa_exp/sweep/confirm.py): the trial it trains again, its seed.
CONFIRMS_TAG, SEED_TAG = "confirms", "seed"
# A retried trial that resumed a checkpoint: its run names the run it continues and the
# step it resumed at; that run names it back.
RESUMED_FROM_TAG, RESUMED_AT_TAG, RESUMED_BY_TAG = "resumed_from", "resumed_at_step", "resumed_by"
# Of a champion's registered version: the values its study searched, "key=value, ...".
SEARCHED_TAG = "searched"

# A text trial's score (finqa_exp/text_eval.py): held-out perplexity, lower is better.
PERPLEXITY = "perplexity"

# Trial states, as Optuna names them (TrialState.name).
COMPLETE, PRUNED, FAIL = "COMPLETE", "PRUNED", "FAIL"

# Artifacts of a trial's run, and the file beside its adapter in the job folder.
CONFIG_ARTIFACT = "config.yaml"
# The short view: a few questions and both answers (text: probes and both completions).
SAMPLES_ARTIFACT = "samples.json"
SCORES_ARTIFACT = "scores.json"  # every scored question, with each score for base and tuned
ADAPTER_ARTIFACT = "adapter"
METRICS_FILE = "metrics.json"
