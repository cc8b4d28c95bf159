"""``python -m finqa_exp.report study=NAME``: the report of a study (finqa_exp/report/build.py).

The Hydra entry point sits here, in the module ``-m`` runs, so that ``config_path`` is
read relative to this file.
"""

import sys

import hydra
from omegaconf import DictConfig

from finqa_exp.config import typed
from finqa_exp.errors import exit_on_bad_input, run_hydra_command
from finqa_exp.report.build import ReportConfig, study_shorthand, write_report


@hydra.main(version_base="1.3", config_path="../../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with exit_on_bad_input("finqa_exp.report"):
        folder = write_report(typed(cfg, ReportConfig))
    print(f"report: {folder / 'report.md'} and {folder / 'report.html'}")


if __name__ == "__main__":
    sys.argv[1:] = study_shorthand(sys.argv[1:])
    run_hydra_command(main, "finqa_exp.report")
