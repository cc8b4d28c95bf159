"""``python -m finqa_exp.bench``: the benchmark (finqa_exp/bench/run.py).

The Hydra entry point sits here, in the module ``-m`` runs, so that ``config_path`` is
read relative to this file.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from finqa_exp.bench.run import BenchConfig, measure, to_markdown, write
from finqa_exp.config import typed
from finqa_exp.errors import exit_on_bad_input, run_hydra_command


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_input("finqa_exp.bench"):
        bc = typed(cfg, BenchConfig)
        results = measure(bc)
    md, js = write(results, Path(bc.out_dir))
    print(to_markdown(results))
    print(f"written: {md} and {js}")


if __name__ == "__main__":
    run_hydra_command(main, "finqa_exp.bench")
