"""``python -m finqa_exp.report study=NAME``: see finqa_exp/report/build.py."""

import sys

from finqa_exp.report.build import main, study_shorthand

sys.argv[1:] = study_shorthand(sys.argv[1:])
main()
