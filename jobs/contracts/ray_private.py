"""The product's only uses of Ray's private modules, each behind one function (Ray 2.60).

Ray offers no public way to do these three things: read the largest size an autoscaling cluster's
config allows (Ray Train's own worker check reads the same), find the IP Ray picks for this node,
and re-read the token-auth mode after setting ``RAY_AUTH_TOKEN`` in-process. ``PRIVATE`` names each
symbol; tests/unit/jobs/test_ray_private.py imports every one, so an upgrade of Ray that moves one
fails there, by name, instead of deep inside a job. Imported lazily: the control plane must start
without connecting to Ray. In jobs/contracts/ so that both jobs/ and orchestrator/ may import it
(workers/ need none of these; workers/data/stream.py uses two private Ray Data methods, listed and tested there).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# use -> (module, attribute), all under ray._private
PRIVATE: dict[str, tuple[str, str]] = {
    "cluster_state": ("ray._private.state", "state"),
    "node_ip_address": ("ray._private.services", "get_node_ip_address"),
    "enable_token_auth": ("ray._private.authentication.authentication_token_setup", "_enable_token_auth"),
}


def private(use: str) -> Any:
    """The private Ray symbol behind ``use`` (a key of ``PRIVATE``)."""
    module, attribute = PRIVATE[use]
    return getattr(importlib.import_module(module), attribute)


def max_cluster_resources() -> dict[str, float] | None:
    """The resources of the cluster at the largest size its autoscaler config allows; None for a
    cluster without one (then only what it has now counts). Needs ``ray.init`` first."""
    return private("cluster_state").get_max_resources_from_cluster_config()


def node_ip_address() -> str:
    """The IP Ray picks for this node (the one a head started here listens on)."""
    return private("node_ip_address")()


def use_auth_token(token: str) -> None:
    """Make this process's next ``ray.init`` present ``token``: Ray's core worker takes it from the
    environment, and the mode is read into Ray's config at import, so it is re-read as Ray's own
    token set-up does."""
    os.environ["RAY_AUTH_TOKEN"] = token
    private("enable_token_auth")()
