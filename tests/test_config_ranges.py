"""Config ranges (issue 20, item 3): every number of every task's data, model and decode config is
range-checked in its dataclass, naming the file and key, before any folder is created.

The cases are generated from the fields' declared ranges (``qkv.config.ranged``), so a new field
with a range is covered automatically; ``test_every_number_has_a_range`` makes a new number without
one fail until it gets a range or a line in ``NO_RANGE`` with the reason.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkv.blocks import BlockConfig
from qkv.config import Range, TrainConfig, check_ranges, from_dict, ranged, ranges
from qkv.errors import ConfigError
from qkv.run import from_mapping
from qkv.tasks import TASKS

SECTIONS = ("data", "model", "decode")
WHERE = "c.yaml"

#: int/float fields with no declared range, and why
NO_RANGE = {
    **{(cls, name): "a header name or a 0-based column index: its range is the file's width, checked when the file "
                    "is read (qkv.data.classification)"
       for cls in ("ClassificationData", "EmbeddingData") for name in ("label_column", "text_column")},
    **{("TranslationData", name): "a TSV column: a header name or a 0-based index, checked against the file"
       for name in ("src_column", "tgt_column")},
}

#: other values that let a value at its field's bound load (the checks across fields: divisibility, sums)
COMPANIONS = {
    ("BlockConfig", "d_model"): {"n_heads": 1},
    ("TransformerConfig", "d_model"): {"n_heads": 1},
    ("DecoderOnlyConfig", "d_model"): {"n_heads": 1},
    ("EncoderOnlyConfig", "d_model"): {"n_heads": 1},
    ("ViTConfig", "d_model"): {"n_heads": 1},
    ("ViTConfig", "image_size"): {"patch_size": 1},
    ("TranslationData", "max_tokens"): {"max_len": 1},
    ("ImageData", "valid_fraction"): {"test_fraction": 0.0},
    ("ImageData", "test_fraction"): {"valid_fraction": 0.0},
    ("ImageEmbeddingData", "valid_fraction"): {"test_fraction": 0.0},
    ("ImageEmbeddingData", "test_fraction"): {"valid_fraction": 0.0},
}


def config_classes() -> dict[str, type]:
    """Every config class that a task section is read into, plus the blocks' and the optimiser's."""
    found = {cls.__name__: cls for spec in TASKS.values()
             for cls in (spec.data_config, spec.model_config, spec.decode_config)}
    return {**found, "BlockConfig": BlockConfig, "TrainConfig": TrainConfig}


def section_fields() -> list[tuple[str, str, type, str, Range]]:
    """(task, section, class, field, range) for every ranged field of every registered task's sections
    (and of the train section, the same class in every task)."""
    out = []
    for task, spec in sorted(TASKS.items()):
        for section, cls in zip(SECTIONS, (spec.data_config, spec.model_config, spec.decode_config)):
            out += [(task, section, cls, name, rng) for name, rng in sorted(ranges(cls).items()) if scalar(cls, name)]
    train = [("lm", "train", TrainConfig, name, rng) for name, rng in sorted(ranges(TrainConfig).items())]
    return out + [case for case in train if scalar(TrainConfig, case[3])]


def scalar(cls: type, name: str) -> bool:
    """An int or float field (or one that may be None); tuples (train.betas) are tested in test_config_limits."""
    annotation = typing.get_type_hints(cls)[name]
    if typing.get_origin(annotation) in (tuple, list):
        return False
    return bool(set(typing.get_args(annotation) or (annotation,)) & {int, float})


FIELDS = section_fields()
IDS = [f"{task}-{section}.{name}" for task, section, _, name, _ in FIELDS]


def is_float(cls: type, name: str) -> bool:
    annotation = typing.get_type_hints(cls)[name]
    return float in (typing.get_args(annotation) or (annotation,))


def just_inside(cls: type, name: str, rng: Range) -> list:
    """The values at each end of the range that the range allows (one step in from an open end)."""
    step = (lambda x, to: math.nextafter(float(x), to)) if is_float(cls, name) else (
        lambda x, to: x + (1 if to > x else -1))
    values = [rng.ge if rng.ge is not None else None, step(rng.gt, math.inf) if rng.gt is not None else None,
              rng.le if rng.le is not None else None, step(rng.lt, -math.inf) if rng.lt is not None else None]
    return [float(v) if is_float(cls, name) else v for v in values if v is not None]


def just_outside(cls: type, name: str, rng: Range) -> list:
    """The nearest values past each end (and, for floats, the non-finite ones)."""
    as_float = is_float(cls, name)
    step = (lambda x, to: math.nextafter(float(x), to)) if as_float else (lambda x, to: x + (1 if to > x else -1))
    values = [step(rng.ge, -math.inf) if rng.ge is not None else None, rng.gt,
              step(rng.le, math.inf) if rng.le is not None else None, rng.lt]
    values = [float(v) if as_float else int(v) for v in values if v is not None]
    return values + ([math.nan, math.inf, -math.inf] if as_float else [])


def load_section(task: str, section: str, values: dict):
    data = {"task": task, section: values}
    return getattr(from_mapping(data, source=WHERE), section)


def assert_refused_naming(task: str, section: str, name: str, value) -> str:
    with pytest.raises(ConfigError) as info:
        load_section(task, section, {name: value})
    message = str(info.value)
    # a non-finite float is refused while its type is read ("c.yaml: model.dropout: must be a finite number")
    assert re.match(rf"{re.escape(WHERE)}: {section}\.{name}:? must be ", message), message
    assert "\n" not in message
    return message


# -- generated from the declared ranges --------------------------------------------------------------
@pytest.mark.parametrize("task,section,cls,name,rng", FIELDS, ids=IDS)
def test_a_value_just_inside_loads(task, section, cls, name, rng):
    for value in just_inside(cls, name, rng):
        values = {name: value, **COMPANIONS.get((cls.__name__, name), {})}
        loaded = load_section(task, section, values)
        assert getattr(loaded, name) == value and type(getattr(loaded, name)) is type(value)


@pytest.mark.parametrize("task,section,cls,name,rng", FIELDS, ids=IDS)
def test_a_value_just_outside_is_refused_naming_the_key(task, section, cls, name, rng):
    outside = just_outside(cls, name, rng)
    assert outside, f"{cls.__name__}.{name}: a range with no bound"
    for value in outside:
        message = assert_refused_naming(task, section, name, value)
        assert ("finite" in message) if isinstance(value, float) and not math.isfinite(value) else (
            rng.describe() in message), message
        with pytest.raises(ValueError, match=rf"\b{name}\b"):  # built in Python: the same range, naming the field
            cls(**{name: value})


def strategy(cls: type, name: str, rng: Range, *, inside: bool) -> st.SearchStrategy:
    """Hypothesis values in (inside=True) or outside the range."""
    low = rng.ge if rng.ge is not None else rng.gt
    high = rng.le if rng.le is not None else rng.lt
    if is_float(cls, name):
        if inside:
            return st.floats(low, high, exclude_min=rng.gt is not None, exclude_max=rng.lt is not None,
                             allow_nan=False, allow_infinity=False)
        parts = [st.floats(max_value=low, exclude_max=rng.ge is not None)] if low is not None else []
        parts += [st.floats(min_value=high, exclude_min=rng.le is not None)] if high is not None else []
        return st.one_of(parts).filter(lambda v: not (v in rng and math.isfinite(v)))
    if inside:
        return st.integers(None if low is None else low + (rng.gt is not None),
                           None if high is None else high - (rng.lt is not None))
    parts = [st.integers(max_value=low - (rng.ge is not None))] if low is not None else []
    parts += [st.integers(min_value=high + (rng.le is not None))] if high is not None else []
    return st.one_of(parts)


@pytest.mark.parametrize("task,section,cls,name,rng", FIELDS, ids=IDS)
def test_any_value_outside_is_refused_and_any_inside_is_not_refused_for_its_range(task, section, cls, name, rng):
    @settings(max_examples=25, deadline=None)
    @given(strategy(cls, name, rng, inside=False))
    def refused(value):
        assert_refused_naming(task, section, name, value)

    @settings(max_examples=25, deadline=None)
    @given(strategy(cls, name, rng, inside=True))
    def not_refused_for_its_range(value):
        try:
            loaded = load_section(task, section, {name: value})
        except ConfigError as err:  # a check across fields (d_model % n_heads) may refuse it, never its range
            assert f"{section}.{name} must be" not in str(err), err
        else:
            assert getattr(loaded, name) == value

    refused()
    not_refused_for_its_range()


def test_every_number_has_a_range_or_a_reason():
    """A new int/float field in a config class fails here until it gets ranged(...) or a NO_RANGE line."""
    missing = []
    for cls_name, cls in sorted(config_classes().items()):
        declared = ranges(cls)
        for field, annotation in typing.get_type_hints(cls).items():
            kinds = set(typing.get_args(annotation) or (annotation,))
            if kinds & {int, float} and field not in declared and (cls_name, field) not in NO_RANGE:
                missing.append(f"{cls_name}.{field}")
    assert not missing, f"numbers with no declared range: {missing}"
    stale = [key for key in NO_RANGE if key[1] in ranges(config_classes()[key[0]])]
    assert not stale, f"NO_RANGE lists fields that have a range now: {stale}"


def test_every_default_is_in_its_range():
    for cls in config_classes().values():
        cls()  # check_ranges in __post_init__
        for f in dataclasses.fields(cls):
            if f.name in ranges(cls) and f.default is not None:
                values = f.default if isinstance(f.default, tuple) else (f.default,)
                assert all(v in ranges(cls)[f.name] for v in values), (cls.__name__, f.name)


def test_the_table_covers_the_sizes_the_issue_names():
    """The ranges the issue lists, in the families that have them (so a dropped range fails here)."""
    want = {("translation", "model", "n_heads"): ">= 1", ("translation", "model", "d_model"): ">= 1",
            ("lm", "model", "n_layers"): ">= 1", ("translation", "model", "src_vocab_size"): ">= 0",
            ("lm", "model", "vocab_size"): ">= 0", ("translation", "data", "max_len"): ">= 1",
            ("translation", "decode", "beam_size"): ">= 1", ("lm", "data", "batch_size"): ">= 1",
            ("image_classification", "model", "patch_size"): ">= 1",
            ("image_classification", "model", "image_size"): ">= 1",
            ("classification", "model", "dropout"): "in [0, 1)", ("lm", "model", "d_ff"): ">= 0",
            ("classification", "model", "n_classes"): ">= 0", ("lm", "decode", "top_p"): "in (0, 1]"}
    found = {(task, section, name): rng.describe() for task, section, _, name, rng in FIELDS}
    assert {key: found.get(key) for key in want} == want


# -- the mechanism ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Example:
    count: int = ranged(1, ge=1)
    share: float = ranged(0.5, ge=0.0, lt=1.0)
    scale: float = ranged(1.0, gt=0.0, le=2.0, note="2 = double")
    maybe: int | None = ranged(None, ge=0)
    pair: tuple[float, float] = ranged((0.1, 0.2), ge=0.0, lt=1.0)
    free: float = 0.0

    def __post_init__(self):
        check_ranges(self)


@pytest.mark.parametrize("values,message", [
    ({"count": 0}, "c.yaml: model.count must be >= 1, got 0"),
    ({"share": 1.0}, "c.yaml: model.share must be in [0, 1), got 1.0"),
    ({"share": -1e-300}, "c.yaml: model.share must be in [0, 1), got -1e-300"),
    ({"scale": 0}, "c.yaml: model.scale must be in (0, 2] (2 = double), got 0.0"),
    ({"maybe": -1}, "c.yaml: model.maybe must be >= 0, got -1"),
    ({"pair": [0.5, 1.5]}, "c.yaml: model.pair[1] must be in [0, 1), got 1.5"),
])
def test_from_dict_names_the_file_and_key_before_the_dataclass_is_built(values, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Example, values, where="c.yaml: model")
    assert str(info.value) == message


def test_direct_construction_is_checked_and_none_means_unset():
    with pytest.raises(ValueError, match=r"^count must be >= 1, got -3$"):
        Example(count=-3)
    with pytest.raises(ValueError, match=r"^scale must be a finite number, got nan$"):
        Example(scale=math.nan)
    assert Example(maybe=None, free=-5.0).maybe is None
    assert from_dict(Example, {"count": 7, "maybe": 0, "scale": 2}, where="c.yaml: model") == Example(
        count=7, maybe=0, scale=2.0)


def test_ranged_refuses_two_bounds_on_one_side():
    with pytest.raises(ValueError, match="one lower bound"):
        ranged(1, ge=0, gt=0)
    assert Range(ge=0, lt=2**32).describe() == "in [0, 2**32)"
