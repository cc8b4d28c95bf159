"""The `finqa_optuna` Hydra sweeper plugin: `python my_app.py -m hydra/sweeper=finqa_optuna`.

Hydra finds it by scanning the `hydra_plugins` namespace package (which has no __init__.py);
the configs and plugin class are in finqa_optuna_sweeper.py, the engine in the finqa_exp.sweep
package (finqa_exp/sweep/sweeper.py).
"""
