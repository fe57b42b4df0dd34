"""Config limits (issue 20, item 3): duplicate YAML keys, alias bombs, and every train number range-checked.

The properties: any finite value in a field's range loads unchanged; any value outside it (NaN and
infinities included) is a ConfigError that names the file and ``train.KEY``.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkv.config import MAX_YAML_NODES, TrainConfig, apply_overrides, from_dict, load_yaml_text, read_yaml
from qkv.errors import ConfigError
from tests.test_input_limits import run_under_memory_limit

WHERE = "c.yaml: train"
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def load_train(**values) -> TrainConfig:
    return from_dict(TrainConfig, values, where=WHERE)


def finite(lo=None, hi=None, *, lo_open=False, hi_open=False):
    return st.floats(min_value=lo, max_value=hi, exclude_min=lo_open, exclude_max=hi_open,
                     allow_nan=False, allow_infinity=False)


NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf, "nan", ".inf", "1e999"])

# field -> (values that must load, values that must be refused)
FLOATS = {
    "lr": (finite(0.0, 1e6, lo_open=True), finite(hi=0.0)),
    "eps": (finite(0.0, 1.0, lo_open=True), finite(hi=0.0)),
    "weight_decay": (finite(0.0, 1e3), finite(hi=0.0, hi_open=True)),
    "layer_lr_decay": (finite(0.0, 1.0, lo_open=True), finite(hi=0.0) | finite(lo=1.0, lo_open=True)),
    "min_lr_ratio": (finite(0.0, 1.0), finite(hi=0.0, hi_open=True) | finite(lo=1.0, lo_open=True)),
    "label_smoothing": (finite(0.0, 1.0, hi_open=True), finite(hi=0.0, hi_open=True) | finite(lo=1.0)),
    "clip_grad_norm": (finite(0.0, 1e6), finite(hi=0.0, hi_open=True)),
    "peak_tflops": (finite(0.0, 1e6), finite(hi=0.0, hi_open=True)),
}
INTS = {  # keep_checkpoints and average_last are tested together below
    "max_steps": (st.integers(1, 10**12), st.integers(max_value=0)),
    "warmup_steps": (st.integers(0, 10**9), st.integers(max_value=-1)),
    "accumulate": (st.integers(1, 10**6), st.integers(max_value=0)),
    "log_every": (st.integers(1, 10**9), st.integers(max_value=0)),
    "eval_every": (st.integers(1, 10**9), st.integers(max_value=0)),
    "save_every": (st.integers(1, 10**9), st.integers(max_value=0)),
    "patience": (st.integers(0, 10**6), st.integers(max_value=-1)),
    "max_skipped": (st.integers(1, 10**6), st.integers(max_value=0)),
    "seed": (st.integers(0, 2**32 - 1), st.integers(max_value=-1) | st.integers(min_value=2**32)),
}


def refused(key: str, **values) -> str:
    with pytest.raises(ConfigError) as info:
        load_train(**values)
    message = str(info.value)
    assert message.startswith("c.yaml: train") and f"train.{key}" in message, message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", sorted(FLOATS))
def test_float_fields_load_in_range_and_refuse_outside(key):
    good, bad = FLOATS[key]

    @SETTINGS
    @given(good)
    def loads(value):
        assert getattr(load_train(**{key: value}), key) == value

    @SETTINGS
    @given(bad | NON_FINITE)
    def refuses(value):
        refused(key, **{key: value})

    loads()
    refuses()


@pytest.mark.parametrize("key", sorted(INTS))
def test_int_fields_load_in_range_and_refuse_outside(key):
    good, bad = INTS[key]

    @SETTINGS
    @given(good)
    def loads(value):
        assert getattr(load_train(**{key: value}), key) == value

    @SETTINGS
    @given(bad)
    def refuses(value):
        refused(key, **{key: value})

    loads()
    refuses()


@SETTINGS
@given(st.tuples(finite(0.0, 1.0, hi_open=True), finite(0.0, 1.0, hi_open=True)))
def test_betas_in_range_load(betas):
    assert load_train(betas=list(betas)).betas == betas


@SETTINGS
@given(st.tuples(finite(0.0, 1.0, hi_open=True), finite(hi=0.0, hi_open=True) | finite(lo=1.0) | NON_FINITE),
       st.booleans())
def test_betas_out_of_range_are_refused(pair, swap):
    refused("betas", betas=list(pair[::-1] if swap else pair))


@SETTINGS
@given(st.integers(1, 1000), st.data())
def test_keep_checkpoints_and_average_last(keep, data):
    average = data.draw(st.integers(0, keep))
    cfg = load_train(keep_checkpoints=keep, average_last=average)
    assert (cfg.keep_checkpoints, cfg.average_last) == (keep, average)
    refused("average_last", keep_checkpoints=keep, average_last=data.draw(st.integers(keep + 1, 10**6)))
    refused("average_last", keep_checkpoints=keep, average_last=data.draw(st.integers(max_value=-1)))
    refused("keep_checkpoints", keep_checkpoints=data.draw(st.integers(max_value=0)))


def test_direct_construction_refuses_nan_too():
    """TrainConfig(...) outside the loader (a test, a notebook) gets the same checks."""
    for key in ("lr", "weight_decay", "clip_grad_norm", "min_lr_ratio"):
        with pytest.raises(ConfigError, match=rf"train\.{key} must be a finite number"):
            TrainConfig(**{key: math.nan})


def test_every_numeric_train_field_is_covered():
    """A new number in TrainConfig must get a range (and a line here)."""
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("int", "float", int, float)}
    assert numeric == set(FLOATS) | set(INTS) | {"keep_checkpoints", "average_last"}


# -- from_dict: any float field of any section ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnySection:
    scale: float = 1.0
    maybe: float | None = None
    pair: tuple[float, float] = (0.0, 1.0)
    count: int = 1


@pytest.mark.parametrize("values", [{"scale": math.nan}, {"scale": "inf"}, {"maybe": -math.inf},
                                    {"pair": [0.5, math.nan]}, {"scale": 10**400}])
def test_from_dict_refuses_non_finite_floats_in_any_section(values):
    key = next(iter(values))
    with pytest.raises(ConfigError, match=rf"^c\.yaml: model\.{key}(\[1\])?: must be a finite number"):
        from_dict(AnySection, values, where="c.yaml: model")


def test_from_dict_keeps_finite_values_and_ints():
    cfg = from_dict(AnySection, {"scale": 3, "maybe": "1e-4", "pair": [0, 0.5]}, where="c.yaml: model")
    assert cfg == AnySection(scale=3.0, maybe=1e-4, pair=(0.0, 0.5))


# -- YAML: duplicate keys, aliases ----------------------------------------------------------------
def write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_duplicate_section_names_the_key_and_line(tmp_path):
    path = write(tmp_path, """\
        task: lm
        train:
          max_steps: 2
        model:
          d_model: 32
        train:
          lr: 1.0
        """)
    with pytest.raises(ConfigError, match=rf"^{path}:6: duplicate key 'train' \(first given on line 2\)"):
        read_yaml(path)


@pytest.mark.parametrize("text,line,key", [
    ("train:\n  lr: 1\n  max_steps: 2\n  lr: 3\n", 4, "lr"),
    ("a:\n  b:\n    c: {x: 1, x: 2}\n", 3, "x"),
    ("data:\n  train: [a.txt]\ndata:\n  x: 1\n", 3, "data"),
    ("list:\n  - {k: 1}\n  - k: 1\n    k: 2\n", 4, "k"),
])
def test_duplicate_keys_at_any_depth(tmp_path, text, line, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: duplicate key '{key}'"):
        read_yaml(path)


def test_same_key_in_different_mappings_and_merge_keys_are_fine(tmp_path):
    path = write(tmp_path, """\
        model: {d_model: 32}
        other: {d_model: 64}
        base: &base {x: 1, y: 2}
        derived:
          <<: *base
          x: 3
        """)
    data = read_yaml(path)
    assert data["derived"] == {"x": 3, "y": 2} and data["other"] == {"d_model": 64}


def billion_laughs() -> str:
    """The classic YAML bomb: 9 levels of 9 aliases, 9^9 (387 million) strings from 429 bytes."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    return text + "#" * (429 - len(text) - 1) + "\n"  # padded to the size the issue measured


def test_billion_laughs_fails_fast_under_a_memory_limit(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    assert path.stat().st_size == 429
    code = f"""
from qkv.config import apply_overrides, read_yaml
from qkv.errors import ConfigError
try:
    apply_overrides(read_yaml({str(path)!r}), [])  # before: expanded by the deep copy in apply_overrides
except ConfigError as err:
    print("ConfigError:", err)
"""
    result = run_under_memory_limit(code, limit=1 << 30, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ConfigError: ") and str(path) in result.stdout, result.stdout
    assert "alias" in result.stdout and f"{MAX_YAML_NODES:,}" in result.stdout


def test_alias_bomb_in_a_set_override_names_the_override():
    bomb = "[" + ", ".join(["&a0 [x,x,x,x,x,x,x,x,x,x]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                                          for i in range(1, 7)]) + "]"
    with pytest.raises(ConfigError, match=r"--set 'train\.x=.*aliases expand to more than"):
        apply_overrides({}, [f"train.x={bomb}"])


def test_recursive_alias_is_refused(tmp_path):
    path = write(tmp_path, "a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: a recursive YAML alias"):
        read_yaml(path)


def test_a_few_aliases_are_fine():
    data = load_yaml_text("x: &x [1, 2]\ny: *x\nz: [*x, *x]\n", name="c.yaml")
    assert data == {"x": [1, 2], "y": [1, 2], "z": [[1, 2], [1, 2]]}


def test_deep_nesting_is_a_config_error(tmp_path):
    path = write(tmp_path, "a: " + "[" * 1200 + "]" * 1200 + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}"):
        read_yaml(path)
