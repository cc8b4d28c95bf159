"""The benchmark: our trial and sweep against the seed project's recipe, side by side.

    python -m finqa_exp.bench
    python -m finqa_exp.bench quick=true

``run`` is the command (sections, rows, targets, output); ``measure`` takes the
measurements, each pair one after the other in the same run. Nothing here judges a
number it did not measure.
"""
