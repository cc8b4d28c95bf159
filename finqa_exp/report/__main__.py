"""``python -m finqa_exp.report study=NAME``: see finqa_exp/report/build.py."""

from finqa_exp.report.build import main

main()
