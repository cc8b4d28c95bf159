"""``python -m finqa_exp.bench``: see finqa_exp/bench/run.py."""

from finqa_exp.bench.run import main

main()
