"""Hydra sweep grammar -> Optuna distributions, and sampled params -> Hydra overrides.

The `finqa_optuna` sweeper (finqa_exp/sweep/sweeper.py) reads `hydra.sweeper.params` and the command
line with these functions; they are pure and unit-tested:

    pytest tests/sweep/test_sweeper.py -k search_space

Grammar, as in hydra-optuna-sweeper:
    choice(a, b) / a,b / glob(...)    -> CategoricalDistribution
    range(start, stop[, step])        -> IntDistribution / FloatDistribution with that step;
                                         stop is exclusive, as in Hydra's basic sweeper
    shuffle(range(...))               -> CategoricalDistribution of the range's values
    interval(low, high)               -> FloatDistribution
    int(interval(low, high))          -> IntDistribution
    tag(log, interval(...))           -> the same with log=True
    anything else (x=3, ~x, +x=y)     -> passed unchanged to every job
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

_PRIMITIVES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class SearchSpace:
    """What the sweeper samples and what it passes through.

    distributions: Optuna param name -> distribution (the name is the override key without
        its +/++ prefix, e.g. `train.lr` or `db@pkg`).
    keys: param name -> override key with its prefix (`+extra`), used to write the override.
    choice_text: param name -> override text of each categorical choice, aligned with
        `distributions[name].choices` (a choice may be a list, sampled as its text).
    fixed: overrides every job gets unchanged (`x=3`, `~y`).
    """

    distributions: dict[str, BaseDistribution]
    keys: dict[str, str]
    choice_text: dict[str, list[str]]
    fixed: list[str]


def format_value(value: Any) -> str:
    """Render a sampled value as the right-hand side of a Hydra override."""
    if not isinstance(value, str):
        return Transformer.str(value)
    escaped = Transformer.str(value)
    # Hydra would read "1", "true" or "it's" as something else: quote them.
    if _parses_back(escaped, value):
        return escaped
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _parses_back(text: str, value: Any) -> bool:
    try:
        parsed = OverridesParser.create().parse_override(f"k={text}").value()
    except Exception:
        return False
    return type(parsed) is type(value) and parsed == value


def _param_name(override: Override) -> str:
    key = override.key_or_group
    return key if override.package is None else f"{key}@{override.package}"


def _categorical(values: Sequence[Any], name: str) -> tuple[CategoricalDistribution, list[str]]:
    choices: list[Any] = []
    texts: list[str] = []
    for value in values:
        if isinstance(value, _PRIMITIVES):
            choices.append(value)
            texts.append(format_value(value))
        else:
            # Optuna choices must be primitives: a list/dict choice is sampled as its text.
            text = Transformer.str(value)
            choices.append(text)
            texts.append(text)
    if not choices:
        raise ValueError(f"{name}: a choice needs at least one value")
    return CategoricalDistribution(choices), texts


def _from_range(value: RangeSweep, values: list[Any], name: str) -> BaseDistribution:
    if not values:
        raise ValueError(f"{name}: range({value.start}, {value.stop}, {value.step}) is empty")
    step = abs(value.step)
    low, count = min(values), len(values)
    if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
        return IntDistribution(int(low), int(low + step * (count - 1)), step=int(step))
    # Derive high from the count, not max(values): repeated float additions drift.
    return FloatDistribution(float(low), float(low + step * (count - 1)), step=float(step))


def _from_interval(value: IntervalSweep, name: str) -> BaseDistribution:
    log = "log" in value.tags
    if value.start is None or value.end is None or value.start > value.end:
        raise ValueError(f"{name}: interval({value.start}, {value.end}) needs low <= high")
    if isinstance(value.start, int) and isinstance(value.end, int):
        return IntDistribution(value.start, value.end, log=log)
    return FloatDistribution(float(value.start), float(value.end), log=log)


def distribution_from_override(
    override: Override,
) -> tuple[BaseDistribution, list[str]] | None:
    """Map one sweep override to (distribution, choice texts); None if it is not a sweep.

    choice texts are only filled for categorical distributions.
    """
    if not override.is_sweep_override():
        return None
    name = _param_name(override)
    value = override.value()
    if isinstance(value, IntervalSweep):
        return _from_interval(value, name), []
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if value.shuffle:
            # A shuffled range is just a set of values; sort so every run builds the same
            # distribution (Optuna rejects a changed choice order on resume).
            return _categorical(sorted(values), name)
        return _from_range(value, values, name), []
    # choice(...), a,b,c and glob(...): Hydra enumerates them.
    return _categorical(list(override.sweep_iterator()), name)


def parse_search_space(
    overrides: Sequence[str], parser: OverridesParser | None = None
) -> SearchSpace:
    """Parse `key=value` overrides (config `params` first, then the command line).

    A later override of the same key wins, so `x=0.5` on the command line fixes a parameter
    that the config sweeps. Pass a parser made with a config loader to allow glob(...).
    """
    parser = parser or OverridesParser.create()
    distributions: dict[str, BaseDistribution] = {}
    keys: dict[str, str] = {}
    choice_text: dict[str, list[str]] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(list(overrides)):
        name = _param_name(override)
        for table in (distributions, keys, choice_text, fixed):
            table.pop(name, None)
        mapped = distribution_from_override(override)
        if mapped is None:
            fixed[name] = _fixed_text(override)
            continue
        distributions[name], texts = mapped
        keys[name] = override.get_key_element()
        if texts:
            choice_text[name] = texts
    return SearchSpace(distributions, keys, choice_text, list(fixed.values()))


def _fixed_text(override: Override) -> str:
    if override.is_delete() and override.value() is None:
        return override.get_key_element()
    return f"{override.get_key_element()}={override.get_value_element_as_str()}"


def trial_overrides(params: Mapping[str, Any], space: SearchSpace) -> list[str]:
    """Overrides for one job: the sampled params (in sampling order) and the fixed ones.

    Params that are not in `space` (added by a custom_search_space function) are written
    with their name as the key.
    """
    lines = []
    for name, value in params.items():
        dist = space.distributions.get(name)
        if isinstance(dist, CategoricalDistribution) and name in space.choice_text:
            text = space.choice_text[name][dist.to_internal_repr(value)]
        else:
            text = format_value(value)
        lines.append(f"{space.keys.get(name, name)}={text}")
    return lines + space.fixed


def grid_values(name: str, dist: BaseDistribution) -> list[Any]:
    """The values a GridSampler should try for one param; discrete distributions only."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None:
        count = math.floor((dist.high - dist.low) / dist.step + 1e-9) + 1
        return [dist.low + i * dist.step for i in range(count)]
    raise ValueError(
        f"the grid sampler needs discrete params; {name} is {dist}: "
        "use choice(...) or range(...) instead of interval(...)"
    )


def grid_size(grid: Mapping[str, Sequence[Any]]) -> int:
    """How many trials a full grid holds."""
    return math.prod(len(values) for values in grid.values())
