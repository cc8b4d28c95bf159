"""Reports: a study's stores (the Optuna study, the MLflow runs) turned into Markdown, HTML
and plots that say which settings won.

    python -m finqa_exp.report study=finqa_tiny_finqa_sample

``build`` is the command's core (config, loading, writing); ``data`` reads the stores,
``numbers`` computes the tables' figures, ``sections`` lays them out, ``render`` writes
Markdown and HTML, ``plots`` draws the PNGs. Nothing here writes to the stores except the
champion's registration (``register=true``).
"""
