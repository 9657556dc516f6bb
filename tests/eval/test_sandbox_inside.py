"""The sandbox's wire format, the runner's choice of names and the launcher's verdict, tested in this process."""

import collections
import enum
import json
import math
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multitoken.eval.sandbox_inside import classify, decode, encode, free_names

_HASHABLE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)  # beyond 64 bits, as hexadecimal on the wire
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.complex_numbers(allow_nan=True, allow_infinity=True)
    | st.text()
    | st.binary()
)
_HASHABLE = _HASHABLE | st.tuples(_HASHABLE, _HASHABLE) | st.frozensets(_HASHABLE, max_size=3)
PLAIN_DATA = st.recursive(
    _HASHABLE,
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(_HASHABLE, children, max_size=4)
        | st.sets(_HASHABLE, max_size=4)
    ),
    max_leaves=24,
)


def same(a, b) -> bool:
    """Equal with the same types all the way down; NaN equals NaN and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a.items(), b.items(), strict=True))
    if isinstance(a, (set, frozenset)):  # NaNs defeat set membership: match elements one by one
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    return a == b


def no_references(obj):
    raise AssertionError(f"plain data was sent by reference: {obj!r}")


@given(PLAIN_DATA)
def test_plain_data_crosses_exactly(value):
    line = json.dumps(encode(value, no_references)).encode()
    assert same(decode(line, no_references), value)


def test_other_values_cross_as_references():
    table = []
    thing, function = object(), lambda: 0
    objects = [thing, len, [b"x", function]]
    line = json.dumps(encode(objects, lambda obj: table.append(obj) or len(table) - 1)).encode()
    assert table == [thing, len, function]
    assert decode(line, lambda n: ("ref", n)) == [("ref", 0), ("ref", 1), [b"x", ("ref", 2)]]


def test_subclasses_of_builtin_data_cross_as_the_builtin_value():
    """As the builtins' own comparisons see them: a Counter equals a dict, a namedtuple a tuple."""

    class Colour(str, enum.Enum):
        RED = "red"

    values = [
        collections.Counter("abb"),
        collections.defaultdict(list, {1: [2]}),
        collections.OrderedDict(a=1),
        collections.namedtuple("P", "x y")(1, 2),
        enum.IntEnum("N", "ONE")(1),
        Colour.RED,
        [int, str, dict],  # builtin types cross by name
    ]
    line = json.dumps(encode(values, no_references)).encode()
    expected = [{"a": 1, "b": 2}, {1: [2]}, {"a": 1}, (1, 2), 1, "red", [int, str, dict]]
    assert same(decode(line, no_references), expected)


@pytest.mark.parametrize(
    "line",
    [b'{"r": "0"}', b'{"t": 5}', b'{"q": 1}', b'{"t": [], "s": []}', b'{"b": "zz"}', b'{"n": "eval"}', b'{"n": 1}',
     b"[" * 100_000, b"{"],
)  # fmt: skip
def test_malformed_input_raises(line):
    with pytest.raises((ValueError, TypeError, KeyError, RecursionError)):
        decode(line, lambda n: n)


@pytest.mark.parametrize(
    "code, names",
    [
        ("assert f(1) == g(2)", {"f", "g"}),
        ("import math\nassert math.isclose(f(1), 2.0)", {"f"}),
        ("def check(candidate):\n    assert candidate(1) == helper(2)\n\ncheck(f)", {"helper", "f"}),
        ("x = 1\nassert f(x) and len([x])", {"f"}),
        ("def t():\n    global y\n    y = 1\n\nassert z(y)", {"z"}),
        ("assert [f(i) for i in range(3)] == [g for g in 'abc']", {"f"}),
        ("class A:\n    v = w\n", {"w"}),
        ("def outer():\n    k = 1\n\n    def inner():\n        return k + m\n\n    return inner\n", {"m"}),
        (
            "for i in range(2):\n    assert i < limit\ntry:\n    f()\nexcept E as e:\n    raise e",
            {"limit", "f", "E"},
        ),
    ],
)
def test_free_names(code, names):
    assert free_names(code) == names


def test_free_names_of_several_sources():
    assert free_names("def helper(x):\n    return x\n", "assert f(helper(1))") == {"f"}


def _exited(code: int) -> int:
    return code << 8


FAILED = {"passed": False, "detail": "AssertionError", "gone": False}
GONE = {"passed": False, "detail": "the program ended before the tests finished", "gone": True}


@pytest.mark.parametrize(
    "runner, verdict, program, expected",
    [
        (_exited(0), {"passed": True, "detail": "", "gone": False}, None, ("passed", "")),
        (_exited(1), {"passed": True, "detail": "", "gone": False}, None, ("failed", "disagrees")),
        (signal.SIGKILL, None, None, ("failed", "terminated by SIGKILL")),
        (_exited(1), FAILED, None, ("failed", "AssertionError")),
        (_exited(1), GONE, (signal.SIGSEGV, 0.1), ("killed", "terminated by SIGSEGV")),
        (_exited(1), GONE, (signal.SIGXCPU, 3.0), ("timeout", "SIGXCPU")),
        (_exited(1), GONE, (signal.SIGKILL, 3.01), ("timeout", "SIGKILL")),
        (_exited(1), GONE, (signal.SIGKILL, 0.5), ("killed", "SIGKILL")),
        (_exited(1), GONE, (_exited(3), 0.1), ("failed", "exited with status 3")),
    ],
)
def test_classify(runner, verdict, program, expected):
    status, detail = classify(runner, verdict, program, cpu_limit=3)
    assert status == expected[0] and expected[1] in detail
