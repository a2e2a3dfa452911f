"""Ray's private symbols the product uses (jobs/contracts/ray_private.py) are all where this Ray keeps them: an
upgrade that moves one fails here, naming it, not deep inside a job. No cluster is started."""

from __future__ import annotations

import importlib

import pytest
import ray

from jobs.contracts import ray_private


@pytest.mark.parametrize("use", sorted(ray_private.PRIVATE))
def test_each_private_ray_symbol_is_where_ray_keeps_it(use):
    module, attribute = ray_private.PRIVATE[use]
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"Ray {ray.__version__} moved {module}.{attribute} ({use}, jobs/contracts/ray_private.py): {e}")
    assert found is ray_private.private(use)


def test_the_private_symbols_have_the_shape_the_product_calls():
    assert callable(ray_private.private("cluster_state").get_max_resources_from_cluster_config)
    assert callable(ray_private.private("enable_token_auth"))
    assert isinstance(ray_private.node_ip_address(), str) and ray_private.node_ip_address()


def test_no_other_product_module_touches_ray_private():
    from tests.unit.test_boundaries import ROOT, SOURCES

    users = sorted(str(p.relative_to(ROOT)) for p in SOURCES if "ray._private" in p.read_text())
    assert users == ["jobs/contracts/ray_private.py"], f"use jobs/contracts/ray_private.py instead: {users}"
