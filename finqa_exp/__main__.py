"""Entry point: ``python -m finqa_exp`` runs one trial, ``python -m finqa_exp -m`` a sweep.

    python -m finqa_exp                                  # tiny offline model, bundled data
    python -m finqa_exp train.learning_rate=3e-4 lora.r=16
    python -m finqa_exp experiment=seed_tinyllama        # the seed recipe (GPU + hub)
    python -m finqa_exp data=local data.path=pairs.csv   # your own Q&A file

All the work happens in :func:`finqa_exp.trial.run_trial`; this file only hands it the
composed config and turns bad input into a one-line error.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from finqa_exp.config import register_configs
from finqa_exp.errors import exit_on_bad_input, run_hydra_command

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from finqa_exp.trial import run_trial

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        return run_trial(cfg)  # the sweeper records a failed trial and goes on
    with exit_on_bad_input("finqa_exp"):
        return run_trial(cfg)


if __name__ == "__main__":
    run_hydra_command(main, "finqa_exp")
