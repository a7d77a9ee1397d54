"""Schedules are pure functions of the step: formula oracles and properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunekit.schedules import SCHEDULES, Constant, Gradual, Iterative, Manual, OneShot, schedule_from_dict

gradual_params = st.tuples(
    st.integers(0, 50),  # t0
    st.integers(1, 20),  # n
    st.integers(1, 10),  # dt
    st.floats(0.0, 0.5),  # s_i
    st.floats(0.5, 0.99),  # s_f
    st.sampled_from([1.0, 2.0, 3.0, 4.5]),
)


@settings(max_examples=200, deadline=None)
@given(gradual_params)
def test_gradual_matches_zhu_gupta_formula_and_is_monotone(params):
    t0, n, dt, s_i, s_f, e = params
    g = Gradual.zhu_gupta(s_i=s_i, t0=t0, n=n, dt=dt, exponent=e)
    values = [g.sparsity(t, s_f) for t in range(t0 + n * dt + 5)]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert all(v == 0.0 for v in values[:t0])
    assert values[t0] == pytest.approx(s_i)
    assert values[t0 + n * dt] == pytest.approx(s_f)
    for k in range(n + 1):
        t = t0 + k * dt
        assert g.updates_at(t)
        assert g.sparsity(t, s_f) == pytest.approx(s_f + (s_i - s_f) * (1 - k / n) ** e)
        if k < n:  # constant between updates
            assert all(g.sparsity(t + j, s_f) == g.sparsity(t, s_f) for j in range(dt))
    updates = [t for t in range(t0 + n * dt + 5) if g.updates_at(t)]
    assert updates == [t0 + k * dt for k in range(n + 1)]


def test_gradual_cubic_oracle():
    g = Gradual(start=0, end=100, every=10)
    # s_t = 0.9 (1 - (1 - t/100)^3): at t = 50 -> 0.9 * 0.875
    assert g.sparsity(50, 0.9) == pytest.approx(0.7875)
    assert g.sparsity(55, 0.9) == pytest.approx(0.7875)
    assert g.sparsity(1000, 0.9) == 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"start": 10, "end": 10, "every": 1}, "ends before it starts"),
        ({"start": 0, "end": 95, "every": 10}, "not a multiple"),
        ({"start": 0, "end": 100, "every": 0}, ">= 1"),
        ({"start": -1, "end": 100, "every": 1}, ">= 0"),
        ({"start": 0, "end": 100, "every": 10, "initial": 1.0}, r"\[0, 1\)"),
        ({"start": 0, "end": 100, "every": 10, "exponent": 0}, "exponent"),
    ],
)
def test_gradual_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Gradual(**kwargs)


def test_gradual_type_errors():
    with pytest.raises(TypeError, match="int"):
        Gradual(start=0, end=10.5, every=1)  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(rounds=st.integers(1, 10), every=st.integers(1, 20), start=st.integers(0, 30), final=st.floats(0.0, 0.99))
def test_iterative_rounds_compound(rounds, every, start, final):
    it = Iterative(rounds=rounds, every=every, start=start)
    r = Iterative.rate(final, rounds)
    for i in range(1, rounds + 1):
        t = start + (i - 1) * every
        assert it.updates_at(t)
        # remaining fraction after i rounds is (1 - r)^i
        assert 1 - it.sparsity(t, final) == pytest.approx((1 - r) ** i)
    assert it.sparsity(start + rounds * every * 3, final) == pytest.approx(final)
    assert not it.updates_at(start + rounds * every)
    assert it.last_update == start + (rounds - 1) * every


def test_oneshot_constant_manual():
    assert [OneShot(at=2).sparsity(t, 0.5) for t in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert [OneShot(at=2).updates_at(t) for t in range(4)] == [False, False, True, False]
    assert Constant(every=3).sparsity(7, 0.4) == 0.4
    assert [Constant(every=3).updates_at(t) for t in range(7)] == [True, False, False, True, False, False, True]
    assert not any(Manual().updates_at(t) for t in range(100))


@pytest.mark.parametrize("schedule", [OneShot(at=3), Constant(every=2), Gradual(start=5, end=25, every=5, initial=0.1),
                                      Iterative(rounds=3, every=7, start=1), Manual()])
def test_round_trip_through_plain_data(schedule):
    import json

    data = json.loads(json.dumps(schedule.to_dict()))
    assert schedule_from_dict(data) == schedule
    assert type(schedule).name in SCHEDULES


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="gradual"):
        schedule_from_dict({"schedule": "cosine"})
