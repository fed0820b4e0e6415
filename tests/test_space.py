"""Space translation, table driven: each dist maps to its Ray domain and samples stay in bounds."""

from __future__ import annotations

import numpy as np
import pytest
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized

from yolotune.errors import ConfigError
from yolotune.space import from_ray, parse_dist, to_ray

TABLE = [
    # (spec, Ray domain type, sampler check, allowed values predicate)
    ({"dist": "uniform", "low": 0.1, "high": 0.5}, Float, None, lambda v: 0.1 <= v <= 0.5),
    ({"dist": "loguniform", "low": 1e-5, "high": 1e-1}, Float, LogUniform, lambda v: 1e-5 <= v <= 1e-1),
    ({"dist": "quniform", "low": 0.0, "high": 1.0, "q": 0.25}, Float, Quantized,
     lambda v: 0 <= v <= 1 and abs(v / 0.25 - round(v / 0.25)) < 1e-9),
    ({"dist": "randint", "low": 1, "high": 3}, Integer, None, lambda v: v in (1, 2, 3)),
    ({"dist": "qrandint", "low": 0, "high": 12, "q": 4}, Integer, Quantized, lambda v: v in (0, 4, 8, 12)),
    ({"dist": "choice", "values": [16, 32, "auto"]}, Categorical, None, lambda v: v in (16, 32, "auto")),
]


@pytest.mark.parametrize("spec,domain_type,sampler_type,allowed", TABLE, ids=[t[0]["dist"] for t in TABLE])
def test_dist_maps_to_ray_domain_and_samples_in_bounds(spec, domain_type, sampler_type, allowed):
    domain = to_ray(parse_dist("space.x", spec))
    assert isinstance(domain, domain_type)
    if sampler_type:
        assert isinstance(domain.get_sampler(), sampler_type)
    samples = domain.sample(size=2000, random_state=np.random.default_rng(0))
    assert all(allowed(v) for v in samples)


@pytest.mark.parametrize("spec,expected", [
    ({"dist": "randint", "low": 1, "high": 3}, {1, 2, 3}),
    ({"dist": "qrandint", "low": 0, "high": 12, "q": 4}, {0, 4, 8, 12}),
    ({"dist": "choice", "values": [16, 32]}, {16, 32}),
])
def test_inclusive_bounds_are_reached(spec, expected):
    samples = to_ray(parse_dist("space.x", spec)).sample(size=2000, random_state=np.random.default_rng(0))
    assert set(samples) == expected


def test_grid_is_a_grid_search():
    assert to_ray(parse_dist("space.x", {"dist": "grid", "values": [1, 2]})) == {"grid_search": [1, 2]}


@pytest.mark.parametrize("text,expected", [
    ("uniform(0, 1)", {"dist": "uniform", "low": 0, "high": 1}),
    ("loguniform(1e-5, 1e-1)", {"dist": "loguniform", "low": 1e-5, "high": 1e-1}),
    ("quniform(0, 1, 0.1)", {"dist": "quniform", "low": 0, "high": 1, "q": 0.1}),
    ("randint(1, 10)", {"dist": "randint", "low": 1, "high": 10}),
    ("choice([16, 32])", {"dist": "choice", "values": [16, 32]}),
    ("grid('SGD', 'AdamW')", {"dist": "grid", "values": ["SGD", "AdamW"]}),
    ("choice([true, false, null])", {"dist": "choice", "values": [True, False, None]}),  # YAML's spellings
    ("grid(true, null)", {"dist": "grid", "values": [True, None]}),
    ("choice(5)", {"dist": "choice", "values": [5]}),  # one value that is not a list
])
def test_compact_string_form(text, expected):
    assert parse_dist("space.x", text) == parse_dist("space.x", expected)


SUGAR_DISTS = "uniform, loguniform, quniform, randint, qrandint, choice, grid"
MISSING = "missing: the distribution needs low and high (and q for quniform and qrandint)"


@pytest.mark.parametrize("spec,message", [
    ("uniform(0)", "space.x=uniform(0): uniform takes (low, high)"),
    ("exec('1')", f"space.x.dist=exec: allowed: {SUGAR_DISTS}"),  # not "exec takes (low, high)"
    ("Uniform(0, 1)", f"space.x.dist=Uniform: allowed: {SUGAR_DISTS}"),
    ("uniform(__import__('os'), 1)", "space.x=uniform(__import__('os'), 1): arguments must be literal numbers or a "
                                     "list of literals"),
    ({"dist": "uniform", "low": 1, "high": 0}, "space.x.low=1: must be < space.x.high (0)"),
    ({"dist": "uniform", "low": 1, "high": 1}, "space.x.low=1: must be < space.x.high (1)"),
    ({"dist": "uniform", "low": 0, "hi": 1}, "space.x.hi=1: allowed fields: dist, high, low, q, values"),
    ({"dist": "randint", "low": 0.5, "high": 2}, "space.x.low=0.5: randint needs integer low and high"),
    ({"dist": "qrandint", "low": 0.5, "high": 10, "q": 1}, "space.x.low=0.5: qrandint needs integer low and high"),
    ({"dist": "qrandint", "low": 0, "high": 2, "q": -1}, "space.x.q=-1: an integer > 0"),
    ({"dist": "qrandint", "low": 0, "high": 2, "q": 0.5}, "space.x.q=0.5: an integer > 0"),
    ({"dist": "quniform", "low": 0, "high": 1, "q": 0}, "space.x.q=0: a number > 0"),
    ({"dist": "quniform", "low": 0, "high": 1}, f"space.x.q=None: {MISSING}"),
    ({"dist": "quniform", "low": 0, "high": 1, "q": "a"}, "space.x.q=a: a finite number"),
    # Off the grid by more than 1e-9 (relative above 1): Ray's rounded samples could leave [low, high].
    ({"dist": "quniform", "low": 1.0000000015, "high": 5, "q": 1},
     "space.x.low=1.0000000015: a multiple of q (1), so that samples stay in [low, high]"),
    ({"dist": "quniform", "low": 0, "high": 1000000.002, "q": 1},
     "space.x.high=1000000.002: a multiple of q (1), so that samples stay in [low, high]"),
    ({"dist": "choice", "values": []}, "space.x.values=[]: choice needs a non-empty list of values"),
    ({"dist": "uniform", "low": "a", "high": 1}, "space.x.low=a: a finite number"),
    ({"dist": "uniform", "low": 0}, f"space.x.high=None: {MISSING}"),
])
def test_bad_specs_name_the_key_and_what_is_allowed(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_dist("space.x", spec)
    assert str(err.value) == message


@pytest.mark.parametrize("spec", [
    {"dist": "quniform", "low": 1.0000000005, "high": 5, "q": 1},     # within 1e-9 of the grid
    {"dist": "quniform", "low": 0, "high": 1000000.0005, "q": 1},     # within 1e-9 relative
    {"dist": "quniform", "low": 0, "high": 123456.7, "q": 0.1},       # 1.5e-11 off in floating point
])
def test_bounds_on_the_grid_up_to_rounding_are_accepted(spec):
    assert parse_dist("space.x", spec).high == spec["high"]


@pytest.mark.parametrize("text", ["randint(0.0, 10.0)", "qrandint(0.0, 10.0, 2.0)"])
def test_integer_distributions_have_integer_bounds(text):
    """Whatever the spelling of the bounds: trials pass samples to Ultralytics' integer arguments."""
    dist = parse_dist("space.x", text)
    assert [type(v) for v in (dist.low, dist.high, dist.q) if v is not None] == [int] * (2 + (dist.q is not None))


@pytest.mark.parametrize("text,message", [
    ("uniform 0 1", f"space.x=uniform 0 1: expected DIST(args), e.g. uniform(0.0, 1.0); DIST one of {SUGAR_DISTS}"),
    ("", f"space.x='': expected DIST(args), e.g. uniform(0.0, 1.0); DIST one of {SUGAR_DISTS}"),
    ("uniform()", "space.x=uniform(): uniform takes (low, high)"),  # no arguments: none, not a syntax error
    ("qrandint( )", "space.x=qrandint( ): qrandint takes (low, high, q)"),
    ("choice()", "space.x.values=[]: choice needs a non-empty list of values"),
])
def test_malformed_compact_strings_say_what_is_expected(text, message):
    with pytest.raises(ConfigError) as err:
        parse_dist("space.x", text)
    assert str(err.value) == message


@pytest.mark.parametrize("domain", [
    tune.uniform(0, 1), tune.loguniform(1e-4, 1e-1), tune.quniform(0, 1, 0.5), tune.randint(0, 5),
    tune.qrandint(0, 10, 2), tune.choice([1, 2]), tune.grid_search(["a", "b"]),
], ids=lambda d: type(d).__name__)
def test_ray_domains_round_trip(domain):
    """The Python API accepts the guide's ``tune.uniform(...)`` domains."""
    back = to_ray(parse_dist("space.x", from_ray("space.x", domain)))
    if isinstance(domain, dict):
        assert back == domain
    elif isinstance(domain, Categorical):
        assert back.categories == domain.categories
    else:
        assert type(back) is type(domain) and (back.lower, back.upper) == (domain.lower, domain.upper)


@pytest.mark.parametrize("domain,spec", [
    (tune.uniform(0, 1), {"dist": "uniform", "low": 0, "high": 1}),
    (tune.loguniform(1e-4, 1e-1), {"dist": "loguniform", "low": 1e-4, "high": 1e-1}),
    (tune.quniform(0, 1, 0.5), {"dist": "quniform", "low": 0, "high": 1, "q": 0.5}),
    (tune.randint(0, 5), {"dist": "randint", "low": 0, "high": 4}),  # Ray's exclusive upper bound, ours inclusive
    (tune.qrandint(0, 10, 2), {"dist": "qrandint", "low": 0, "high": 10, "q": 2}),
    (tune.choice([1, 2]), {"dist": "choice", "values": [1, 2]}),
    (tune.grid_search(["a", "b"]), {"dist": "grid", "values": ["a", "b"]}),
], ids=["uniform", "loguniform", "quniform", "randint", "qrandint", "choice", "grid"])
def test_ray_domains_become_these_specs(domain, spec):
    assert from_ray("space.x", domain) == spec


NOT_A_DOMAIN = ("a Ray Tune domain (tune.uniform, loguniform, quniform, randint, qrandint, choice, grid_search) "
                "or a yolotune space mapping")


def _pick(spec):
    return 0.1


@pytest.mark.parametrize("domain,written,allowed", [
    (tune.qloguniform(1e-5, 1e-1, 1e-5), "tune.qloguniform(1e-05, 0.1, 1e-05)",
     "qloguniform is not supported; use loguniform"),
    (tune.randn(0, 1), "tune.randn(0, 1)", "a normal distribution is not supported; use uniform or loguniform"),
    (tune.qrandn(0, 1, 0.5), "tune.qrandn(0, 1, 0.5)",
     "a normal distribution is not supported; use uniform or loguniform"),
    (tune.lograndint(1, 100), "tune.lograndint(1, 100)", "lograndint is not supported; use randint or qrandint"),
    (tune.qlograndint(1, 100, 2), "tune.qlograndint(1, 100, 2)", "lograndint is not supported; use randint or qrandint"),
    (tune.sample_from(_pick), "tune.sample_from(_pick)", NOT_A_DOMAIN),
    (0.5, 0.5, NOT_A_DOMAIN), ({"grid_search": [1], "x": 2}, {"grid_search": [1], "x": 2}, NOT_A_DOMAIN),
], ids=["qloguniform", "randn", "qrandn", "lograndint", "qlograndint", "sample_from", "number", "grid-and-more"])
def test_unsupported_ray_domains_name_the_key_and_the_domain_as_written(domain, written, allowed):
    """Named as the call that made them, not as Ray's repr (<ray.tune.search.sample.Float object at 0x...>)."""
    with pytest.raises(ConfigError) as err:
        from_ray("space.x", domain)
    assert (err.value.key, err.value.value, err.value.allowed) == ("space.x", written, allowed)
