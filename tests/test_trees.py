"""conformance.trees: the one walk over tensors nested in a component's arguments and outputs.

The names ``leaves`` gives are stored in goldens (``goldens.flatten_tensors``, ``tensor_digest``) and shown in reports
(the probes' tensor names), so they are pinned here as well as the round trip of ``map_tensors``.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance import trees
from conformance.goldens import flatten_tensors


def _tensor(i: int) -> torch.Tensor:
    return torch.full((2,), float(i))


NESTED = st.recursive(
    st.one_of(st.integers(0, 9).map(_tensor), st.none(), st.integers(), st.text(max_size=3)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.text("abc", min_size=1, max_size=2), inner, max_size=3),
    ),
    max_leaves=12,
)


def test_names_are_those_stored_in_goldens_and_shown_by_the_probes():
    value = {"x": torch.zeros(1), "rope": (torch.ones(1), [torch.ones(1), None]), "opts": {"n": 3, "t": torch.ones(1, dtype=torch.int64)}}
    assert [name for name, _ in trees.leaves(value)] == ["x", "rope.0", "rope.1.0", "opts.n", "opts.t"]
    assert [name for name, _ in trees.leaves(value, "kw", brackets=True, tensors_only=True)] == [
        "kw.x", "kw.rope[0]", "kw.rope[1][0]", "kw.opts.t",
    ]  # fmt: skip
    assert [name for name, _ in trees.floating_tensors(value, "kw")] == ["kw.x", "kw.rope[0]", "kw.rope[1][0]"]
    flat = flatten_tensors({"c": torch.ones(2, dtype=torch.complex64), "v": 1.5})
    assert set(flat) == {"c@complex", "v"} and flat["c@complex"].shape == (2, 2)


@settings(max_examples=60, deadline=None)
@given(NESTED)
def test_map_tensors_keeps_every_container_and_reaches_every_tensor(value):
    seen = list(trees.tensors(value))
    doubled = trees.map_tensors(value, lambda t: t * 2)
    assert all(torch.equal(a * 2, b) for a, b in zip(seen, trees.tensors(doubled), strict=True))
    assert _shape_of(doubled) == _shape_of(value)


def _shape_of(value):
    """The containers and non-tensor leaves of a value, with tensors as a placeholder."""
    if isinstance(value, torch.Tensor):
        return "T"
    if isinstance(value, (tuple, list)):
        return type(value).__name__, [_shape_of(v) for v in value]
    if isinstance(value, dict):
        return "dict", {k: _shape_of(v) for k, v in value.items()}
    return value
