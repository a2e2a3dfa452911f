"""Property-based fuzz of every route and every file open that takes a path: a user's job can never
name (at submission) nor reach (when the job opens a file) a path outside its team's roots.

The tree (real folders and real symlinks)::

    base/nlp/            team nlp's root (with s3://bucket/nlp)
        corpus/doc.py    a file inside
        inner -> corpus  a link that stays inside
        escape -> ../secret, a -> b, b -> ../secret (a chain out)
    base/nlp2/           a sibling whose name starts like the root
    base/secret/key      another team's file

Paths are drawn from prefixes (absolute, relative, ``~``, ``file://``, ``s3://`` in any case, other
buckets) and components (``..``, ``.``, empty (``//``), the links, unicode look-alikes of ``/``,
``.`` and ``nlp``). The oracle is written apart from the product: a local path is inside when it is
absolute and its real path lies under the root's real path; an ``s3://`` key when, its ``.`` and
empty components dropped and ``..`` applied, it never climbs above the bucket and starts with
``bucket/nlp``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from tests.support.fakes import FakeRay
from workers.confine import Confinement, OutsideRoots

TOKEN = "security-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {"name": "fuzz", "model": {"n_layers": 1, "d_model": 32, "n_heads": 2}, "train": {"steps": 4}}
EXAMPLES = 120  # per property; every example is a real request or a real open (< 15 s each here)


def _tree(base: Path) -> Path:
    for d in ("nlp/corpus", "nlp2", "secret"):
        (base / d).mkdir(parents=True)
    (base / "nlp/corpus/doc.py").write_text("inside\n")
    (base / "secret/key").write_text("another team's secret\n")
    (base / "nlp2/doc.py").write_text("sibling\n")
    os.symlink("corpus", base / "nlp/inner")
    os.symlink("../secret", base / "nlp/escape")
    os.symlink("b", base / "nlp/a")
    os.symlink("../secret", base / "nlp/b")
    return base


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = _tree(tmp_path_factory.mktemp("tree"))
    settings_ = Settings(api_token=TOKEN, state_dir=base / "state", ray_address=None, reconcile_interval_s=60)
    ray = FakeRay(auto_run=False)
    ray.reachable = False  # jobs stay stored; nothing runs
    app = create_app(settings_, ray=ray)
    with TestClient(app) as client:
        assert client.put("/v1/teams/nlp", json={"roots": [str(base / "nlp"), "s3://bucket/nlp"]},
                          headers=AUTH).status_code == 200
        token = client.post("/v1/tokens", json={"user": "alice", "team": "nlp"}, headers=AUTH).json()["token"]
        yield base, client, {"Authorization": f"Bearer {token}"}
    app.state.store.close()


COMPONENTS = st.sampled_from(["corpus", "doc.py", "..", ".", "", "inner", "escape", "a", "b", "nlp", "nlp2",
                              "secret", "key", "x", "\uff0fsecret", "\u2024\u2024", "\uff4e\uff4c\uff50",
                              "nlp\u200b", "~", "%2e%2e"])


# Components that keep a path on real folders: the links, ``..`` and no-ops.
LINKS = st.sampled_from(["", ".", "..", "inner", "corpus", "escape", "a", "b", "nlp", "secret"])


def _paths(base: Path) -> st.SearchStrategy[str]:
    prefixes = st.sampled_from([str(base / "nlp"), str(base / "nlp2"), str(base / "secret"), str(base), "/",
                                "", "~", "~/", "relative", f"file://{base}/nlp", "s3://bucket/nlp",
                                "S3://bucket/nlp", "s3://bucket/nlp2", "s3://bucket", "s3://other/nlp",
                                "s3://bucket//nlp", f"{base}//nlp"])
    return st.builds(lambda p, parts, sep: sep.join([p, *parts]) if parts else p,
                     prefixes, st.lists(COMPONENTS, max_size=5), st.sampled_from(["/", "//"]))


def _files(base: Path) -> st.SearchStrategy[str]:
    """Paths that end in a file name (most of them name a real file, through links or not)."""
    local = st.sampled_from([str(base / "nlp"), str(base / "nlp" / "corpus"), str(base / "secret"), str(base / "nlp2")])
    return st.builds(lambda p, parts, name: "/".join([p, *parts, name]),
                     local, st.lists(LINKS, max_size=3), st.sampled_from(["doc.py", "key"]))


def _s3_inside(path: str) -> bool:
    bucket, _, key = path[5:].partition("/")
    parts: list[str] = []
    for c in key.split("/"):
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(c)
    return bucket == "bucket" and parts[:1] == ["nlp"]


def _inside(path: str, base: Path) -> bool:
    """The oracle: may team nlp's job name ``path``?"""
    if path[:5].lower() == "s3://":
        return _s3_inside(path)
    if "://" in path or not os.path.isabs(path) or "\x00" in path:
        return False
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(base / "nlp"))
    return real == root or root in real.parents


def _body(kind: str, field: str, path: str) -> dict:
    if kind == "train":
        spec = TINY | ({"checkpoint_storage": path} if field == "checkpoint_storage" else {"data": {field: path}})
    elif kind == "prepare":
        spec = {"name": "p", field: path}
    else:  # sweep
        spec = {"name": "s", "space": {"train.lr": {"type": "choice", "values": [0.001, 0.002]}},
                "base": TINY | {"data": {field: path}}}
    return {"kind": kind, "spec": spec}


FIELDS = [("train", "source"), ("train", "path"), ("train", "checkpoint_storage"),
          ("prepare", "source"), ("prepare", "path"), ("sweep", "source"), ("sweep", "path")]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_job_is_accepted_only_with_paths_inside_its_roots(world, data):
    base, client, alice = world
    kind, field = data.draw(st.sampled_from(FIELDS), label="field")
    path = data.draw(_paths(base), label="path")
    r = client.post("/v1/jobs", json=_body(kind, field, path), headers=alice)
    assert r.status_code < 500, r.text
    if r.status_code == 202:
        assert _inside(path, base), f"{kind} {field}={path!r} was accepted"
    elif _inside(path, base) and path[:5].lower() != "s3://":
        # Refused for another reason than the roots? Then the reason must name the spec, not the root.
        assert r.status_code == 422 and all(e["type"] != "data_root" for e in r.json()["detail"]), r.text


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_deployment_never_pins_a_checkpoint_outside_its_roots(world, data):
    """Local paths only: an ``s3://`` checkpoint is listed on S3, which this test has none of."""
    base, client, alice = world
    path = data.draw(_paths(base).filter(lambda p: p[:5].lower() != "s3://"), label="path")
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": path, "num_cpus": 0}}, headers=alice)
    assert r.status_code in (400, 404, 409, 422), r.text  # no checkpoint anywhere in the tree: never 201
    if r.status_code == 422 and not _inside(path, base):
        assert r.json()["detail"][0]["loc"] == ["body", "spec", "checkpoint"], r.text


def _files_under(root: Path) -> set[tuple[int, int]]:
    """(device, inode) of every file physically under ``root``, links not followed."""
    found = set()
    for folder, _, files in os.walk(root, followlinks=False):
        for name in files:
            st_ = os.lstat(os.path.join(folder, name))
            found.add((st_.st_dev, st_.st_ino))
    return found


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_confined_open_never_reaches_a_file_outside_the_roots(world, data):
    """Whatever the path (links, chains, ``..``), a file the job opens is physically under a root."""
    base = world[0]
    path = data.draw(st.one_of(_files(base), _paths(base)), label="path")
    inside = _files_under(base / "nlp")
    confinement = Confinement((str(base / "nlp"),))
    try:
        with confinement.open(path) as f:
            st_ = os.fstat(f.fileno())
    except OutsideRoots:
        return
    except (OSError, ValueError):  # no such file, a folder, a NUL: nothing opened
        return
    assert (st_.st_dev, st_.st_ino) in inside, f"{path!r} opened a file outside the root"


@pytest.mark.parametrize(("path", "opens"), [
    ("nlp/corpus/doc.py", True), ("nlp/inner/doc.py", True), ("nlp/inner/../corpus/doc.py", True),
    ("nlp/escape/key", False), ("nlp/a/key", False), ("nlp/b/key", False), ("nlp/../secret/key", False),
    ("nlp/../nlp2/doc.py", False), ("nlp/inner/../../secret/key", False),
])
def test_confined_opens_follow_links_inside_and_refuse_links_out(world, path, opens):
    """The cases the property covers, named: links that stay inside are followed, chains out are not."""
    base = world[0]
    confinement = Confinement((str(base / "nlp"),))
    if opens:
        with confinement.open(base / path) as f:
            assert f.read() == b"inside\n"
    else:
        with pytest.raises(OutsideRoots, match=r"resolves to .*outside the team's data roots"):
            confinement.open(base / path)
    assert Confinement((str(base),)).open(base / path).close() is None  # a wider root opens them all
