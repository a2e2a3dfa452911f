"""/v1/deployments and /v1/sweeps/{id}/promote without a cluster (the reconciler needs one; here rows
stay QUEUED): the key shown once and stored hashed, team scoping on every route, data roots,
conflicts, a finished job's and a sweep's best checkpoint, s3:// checkpoints (the session's moto
server) and a job's ``checkpoint_storage``. The reconciler's decisions are checked
one pass at a time against a fake Ray and a scripted Serve. Real Ray + Serve: tests/integration/serving/test_deployments.py.
"""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow.fs as pafs
import pytest
from fastapi.routing import APIRoute

from jobs.contracts.sweep_events import append_event
from jobs.specs.serve import resolve_s3_checkpoint
from orchestrator.controller.entrypoints import job_paths
from orchestrator.deployments.reconciler import DeploymentReconciler
from orchestrator.deployments.serve_status import AppView, parse_applications
from orchestrator.local.head import free_port
from orchestrator.ray_client import RayJobView
from orchestrator.scheduler.service import Scheduler
from orchestrator.states import JobState
from orchestrator.store import DeploymentStatus, deploy_submission_id
from tests.support.control_plane import AUTH
from tests.support.fakes import summary_json

SWEEP_SPEC = {"name": "sw", "metric": "loss", "mode": "min", "trials": 2,
              "space": {"train.lr": {"type": "choice", "values": [0.001, 0.002]}},
              "base": {"name": "b", "train": {"steps": 20}}}


@pytest.fixture
def settings(settings):
    """No controller: the jobs these tests store stay in the states they put them in."""
    return settings.model_copy(update={"controller_enabled": False})


def _checkpoint(path):
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"format": 1, "step": 10, "model": {}}))
    return path


def _s3_checkpoint(s3_server, uri: str) -> str:
    """A fake checkpoint at the ``s3://`` prefix ``uri``: its meta.json, what the resolver looks for."""
    fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint, region=s3_server.REGION)
    with fs.open_output_stream(f"{uri.removeprefix('s3://')}/meta.json") as f:
        f.write(json.dumps({"format": 1, "step": 10, "model": {}}).encode())
    return uri


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def users(client):
    """alice (team nlp, data root <tmp>/nlp) and carol (team cv)."""
    made = {}
    for user, team in (("alice", "nlp"), ("carol", "cv")):
        made[user] = _bearer(client.post("/v1/tokens", json={"user": user, "team": team}, headers=AUTH).json()["token"])
    return made


@pytest.fixture
def nlp_root(client, tmp_path):
    root = tmp_path / "nlp"
    assert client.put("/v1/teams/nlp", json={"roots": [str(root)]}, headers=AUTH).status_code == 200
    return root


@pytest.fixture
def nlp_s3(client, nlp_root, s3_bucket) -> str:
    """Team nlp's S3 data root, s3://<bucket>/nlp, beside its local one."""
    root = f"s3://{s3_bucket}/nlp"
    assert client.put("/v1/teams/nlp", json={"roots": [str(nlp_root), root]}, headers=AUTH).status_code == 200
    return root


def _finished_job(app, kind="train", spec=None, state=JobState.SUCCEEDED, team="nlp"):
    store = app.state.store
    job, _ = store.jobs.create(kind=kind, name="j", spec=spec or {"name": "j"}, max_retries=0, team=team, owner="alice")
    for s in (JobState.QUEUED, JobState.STARTING, JobState.RUNNING, state)[: 4 if state.terminal else 3]:
        store.jobs.transition(job.id, s, "test", new_attempt=s is JobState.STARTING)
    return job.id


def test_create_shows_the_key_once_and_stores_only_its_hash(client, app, users, nlp_root):
    ckpt = _checkpoint(nlp_root / "run" / "ray-train" / "step-00000010")
    _checkpoint(nlp_root / "run" / "ray-train" / "step-00000002")
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": str(nlp_root / "run"), "num_cpus": 0}},
                    headers=users["alice"])
    assert r.status_code == 201, r.text
    d = r.json()
    key = d["api_key"]
    assert d["name"] == d["id"] and d["route_prefix"] == f"/{d['id']}" and d["team"] == "nlp"
    assert d["checkpoint"] == str(ckpt) and d["status"] == "QUEUED"  # the newest, pinned at creation
    assert d["base_url"] == f"http://127.0.0.1:8000/{d['id']}/v1"
    assert d["spec"]["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
    shown = client.get(f"/v1/deployments/{d['id']}", headers=users["alice"]).json()
    assert "api_key" not in shown and shown["spec"]["num_cpus"] == 0
    assert key not in (app.state.settings.state_dir / "orch.db").read_bytes().decode("latin-1")
    [entry] = [e for e in client.get("/v1/audit", headers=AUTH).json()["data"] if e["action"].startswith("deploy")]
    assert (entry["action"], entry["target"], entry["actor"]) == ("deployment.create", d["id"], "alice")


def test_another_team_gets_a_404_on_every_deployment_route(client, app, users, nlp_root):
    _checkpoint(nlp_root / "c")
    mine = client.post("/v1/deployments", json={"spec": {"checkpoint": str(nlp_root / "c")}},
                       headers=users["alice"]).json()["id"]

    def walk(routes, prefix=""):
        for r in routes:
            if isinstance(r, APIRoute) and "{deployment_id}" in prefix + r.path:
                yield from ((m, prefix + r.path) for m in sorted(r.methods - {"HEAD", "OPTIONS"}))
            elif hasattr(r, "original_router"):
                yield from walk(r.original_router.routes, prefix + r.include_context.prefix)

    routes = sorted(set(walk(app.routes)))
    assert routes == [("DELETE", "/v1/deployments/{deployment_id}"), ("GET", "/v1/deployments/{deployment_id}"),
                      ("GET", "/v1/deployments/{deployment_id}/stats")]
    for method, path in routes:
        theirs = client.request(method, path.replace("{deployment_id}", mine), headers=users["carol"])
        missing = client.request(method, path.replace("{deployment_id}", "d000000000000"), headers=users["carol"])
        assert theirs.status_code == missing.status_code == 404, (method, path)
        assert theirs.json()["detail"].replace(mine, "X") == missing.json()["detail"].replace("d000000000000", "X")
    assert client.get("/v1/deployments", headers=users["carol"]).json() == {"data": [], "count": 0}
    assert client.get("/v1/deployments", headers=users["alice"]).json()["count"] == 1
    assert client.get("/v1/deployments", headers=AUTH).json()["count"] == 1  # admin sees all
    assert client.get(f"/v1/deployments/{mine}", headers=users["alice"]).json()["status"] == "QUEUED"
    r = client.delete(f"/v1/deployments/{mine}", headers=users["alice"])
    assert r.status_code == 202 and r.json()["status"] == "DELETING"


@pytest.mark.parametrize(("body", "loc", "words"), [
    ({"spec": {"checkpoint": "/etc"}}, ["body", "spec", "checkpoint"], "outside your team's data roots"),
    ({"spec": {"checkpoint": "{root}/nothing"}}, ["body", "spec", "checkpoint"], "neither a checkpoint"),
    ({"spec": {"checkpoint": "{root}/c", "key_sha256": "a" * 64}}, ["body", "spec", "key_sha256"], "makes each"),
    ({"spec": {"num_cpus": 0}}, ["body"], "exactly one of spec.checkpoint"),
])
def test_bad_bodies_are_a_422_naming_the_field(client, users, nlp_root, body, loc, words):
    _checkpoint(nlp_root / "c")
    body = json.loads(json.dumps(body).replace("{root}", str(nlp_root)))
    r = client.post("/v1/deployments", json=body, headers=users["alice"])
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == loc and words in err["msg"], err


def test_names_and_route_prefixes_are_unique_and_never_nested(client, users, nlp_root):
    ckpt = str(_checkpoint(nlp_root / "c"))
    assert client.post("/v1/deployments", json={"name": "alpha", "spec": {"checkpoint": ckpt}},
                       headers=users["alice"]).status_code == 201
    for body in ({"name": "alpha"}, {"name": "other", "spec": {"route_prefix": "/alpha/v1"}},
                 {"name": "root", "spec": {"route_prefix": "/"}}):
        body["spec"] = {"checkpoint": ckpt, **body.get("spec", {})}
        r = client.post("/v1/deployments", json=body, headers=users["alice"])
        assert r.status_code == 409 and ("name" in r.json()["detail"] or "overlaps" in r.json()["detail"]), r.text
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": ckpt, "name": "beta", "route_prefix": "/alphabet"}},
                    headers=users["alice"])
    assert r.status_code == 201 and r.json()["name"] == "beta"  # a name's prefix, not a path's


def test_a_finished_jobs_latest_checkpoint_needs_the_job_visible_and_done(client, app, users):
    job_id = _finished_job(app)
    out = job_paths(app.state.settings.job_root, job_id).out
    ckpt = _checkpoint(out / "ray-train" / "step-00000004")
    assert client.post("/v1/deployments", json={"job_id": job_id}, headers=users["carol"]).status_code == 404
    r = client.post("/v1/deployments", json={"job_id": job_id}, headers=users["alice"])
    assert r.status_code == 201, r.text
    assert r.json()["checkpoint"] == str(ckpt) and r.json()["source"] == f"job {job_id}"
    running = _finished_job(app, state=JobState.RUNNING)
    assert client.post("/v1/deployments", json={"job_id": running}, headers=users["alice"]).status_code == 409


def test_promote_serves_the_sweeps_best_trial(client, app, users):
    sweep_id = _finished_job(app, kind="sweep", spec=SWEEP_SPEC)
    out = job_paths(app.state.settings.job_root, sweep_id).out
    out.mkdir(parents=True)
    ckpts = {t: _checkpoint(out / "trials" / t / "train" / "step-00000020") for t in ("t1", "t2")}
    for trial, loss in (("t1", 2.5), ("t2", 1.5)):
        append_event(out, "start", trial, parameters={"train.lr": 0.001})
        append_event(out, "result", trial, metrics={"step": 20, "loss": loss, "checkpoint": str(ckpts[trial])})
        append_event(out, "complete", trial, state="SUCCEEDED")
    assert client.post(f"/v1/sweeps/{sweep_id}/promote", headers=users["carol"]).status_code == 404
    r = client.post(f"/v1/sweeps/{sweep_id}/promote", json={"name": "best", "spec": {"num_cpus": 0}},
                    headers=users["alice"])
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["checkpoint"], d["source"], d["name"]) == (str(ckpts["t2"]), f"sweep {sweep_id} trial t2", "best")
    assert d["api_key"] and d["spec"]["num_cpus"] == 0
    running = _finished_job(app, kind="sweep", spec=SWEEP_SPEC, state=JobState.RUNNING)
    assert client.post(f"/v1/sweeps/{running}/promote", headers=users["alice"]).status_code == 409
    r = client.post(f"/v1/sweeps/{sweep_id}/promote", json={"spec": {"checkpoint": "/x"}}, headers=users["alice"])
    assert r.status_code == 422


# -- the reconciler, one pass at a time ---------------------------------------------------------------


class ScriptedServe:
    def __init__(self):
        self.apps: dict[str, AppView] = {}

    def applications(self):
        return dict(self.apps)


def _deployment(client, app, tmp_path, name="alpha"):
    """A new deployment, admitted as the controller's scheduling step would (no controller runs here)."""
    ckpt = _checkpoint(tmp_path / name)
    r = client.post("/v1/deployments", json={"name": name, "spec": {"checkpoint": str(ckpt)}}, headers=AUTH)
    store = app.state.store
    decisions = Scheduler(app.state.settings).plan([], app.state.ray, {}, store.deployments.list()[0])
    store.deployments.record_queue([a.job_id for a in decisions.serving_admit], [])
    return store.deployments.get(r.json()["id"])


def test_reconciler_deploys_retries_gives_up_and_never_takes_a_foreign_name(client, app, fake_ray, tmp_path):
    fake_ray.auto_run = False
    serve = ScriptedServe()
    rec = DeploymentReconciler(app.state.store, fake_ray, serve, app.state.settings)
    store = app.state.store
    d = _deployment(client, app, tmp_path)
    rec.reconcile_once()
    [sub] = fake_ray.submissions
    assert sub["submission_id"] == deploy_submission_id(d.id, 1)
    assert re.fullmatch(r"python -m jobs\.serve --spec \S+/deployments/d\w+/spec\.json --host 127\.0\.0\.1 "
                        r"--port 8000", sub["entrypoint"])
    assert store.deployments.get(d.id).status is DeploymentStatus.DEPLOYING
    rec.reconcile_once()
    assert len(fake_ray.submissions) == 1  # still running: nothing new
    for n in range(1, 4):  # each deploy fails; the third failure in a row is the last
        fake_ray.jobs[deploy_submission_id(d.id, n)] = RayJobView(deploy_submission_id(d.id, n), "FAILED", "boom")
        rec.reconcile_once()
    d = store.deployments.get(d.id)
    assert (d.status, d.deploys, d.failures) == (DeploymentStatus.FAILED, 3, 3) and "boom" in d.message
    rec.reconcile_once()
    assert len(fake_ray.submissions) == 3

    other = _deployment(client, app, tmp_path, name="taken")
    serve.apps["taken"] = AppView("RUNNING", "", "/taken", {"RUNNING": 1})
    rec.reconcile_once()
    assert store.deployments.get(other.id).status is DeploymentStatus.FAILED and len(fake_ray.submissions) == 3
    client.delete(f"/v1/deployments/{other.id}", headers=AUTH)
    rec.reconcile_once()  # never deployed by us: the row goes, the foreign application stays
    assert store.deployments.list()[1] == 1 and not fake_ray.stops and len(fake_ray.submissions) == 3


def test_serve_details_parse_into_status_and_replica_counts():
    details = {"applications": {"a": {"status": "RUNNING", "message": "", "route_prefix": "/a", "deployments": {
        "CompletionServer": {"replicas": [{"state": "RUNNING"}, {"state": "STARTING"}, {"state": "RUNNING"}]}}}}}
    assert parse_applications(details) == {"a": AppView("RUNNING", "", "/a", {"RUNNING": 2, "STARTING": 1})}
    assert parse_applications({"applications": {}}) == {}


def test_orch_serve_prints_the_key_once_and_deployments_lists_shows_deletes(app, tmp_path, monkeypatch, capsys):
    from orchestrator import cli
    from tests.support.control_plane import TOKEN
    from tests.support.servers import BackgroundServer

    ckpt = _checkpoint(tmp_path / "c")
    with BackgroundServer(app) as url:
        monkeypatch.setenv("ORCH_URL", url)
        monkeypatch.setenv("ORCH_API_TOKEN", TOKEN)
        assert cli.main(["serve", str(ckpt), "--name", "cli-model", "--set", "num_cpus=0"]) == 0
        out = capsys.readouterr().out
        key = re.search(r"API key \(shown once.*\): (\S+)", out).group(1)
        [d] = app.state.store.deployments.list()[0]
        assert d.name == "cli-model" and d.spec["num_cpus"] == 0
        assert d.spec["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
        assert "OpenAI base URL: http://127.0.0.1:8000/cli-model/v1" in out
        assert cli.main(["deployments"]) == 0 and "cli-model" in capsys.readouterr().out
        assert cli.main(["deployments", "show", d.id]) == 0 and key not in capsys.readouterr().out
        assert cli.main(["deployments", "delete", d.id]) == 0 and "DELETING" in capsys.readouterr().out
        assert cli.main(["serve"]) == 2 and "CHECKPOINT" in capsys.readouterr().err
        assert cli.main(["serve", "/nowhere", "--name", "x"]) == 2  # the API's 422, naming the field
        assert "spec.checkpoint" in capsys.readouterr().err


def test_a_run_folders_link_to_a_checkpoint_outside_the_roots_is_refused(client, users, nlp_root, tmp_path):
    outside = _checkpoint(tmp_path / "secret" / "ckpt")
    (nlp_root / "run").mkdir(parents=True)
    (nlp_root / "run" / "step-00000009").symlink_to(outside)
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": str(nlp_root / "run")}}, headers=users["alice"])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "spec", "checkpoint"]
    assert "outside your team's data roots" in r.json()["detail"][0]["msg"]


# -- s3:// checkpoints and a job's checkpoint_storage -------------------------------------------------


def test_an_s3_run_prefix_is_pinned_to_its_newest_step_at_creation(client, app, users, nlp_s3, s3_server):
    run = f"{nlp_s3}/run"
    _s3_checkpoint(s3_server, f"{run}/ray-train/step-00000002")
    newest = _s3_checkpoint(s3_server, f"{run}/ray-train/step-00000010")
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": run}}, headers=users["alice"])
    assert r.status_code == 201, r.text
    assert (r.json()["checkpoint"], r.json()["source"]) == (newest, run)
    _s3_checkpoint(s3_server, f"{run}/ray-train/step-00000020")  # the run goes on after the deployment
    spec = app.state.store.deployments.get(r.json()["id"]).spec
    assert resolve_s3_checkpoint(spec["checkpoint"]) == newest  # what a redeploy's replicas load
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": newest.replace("s3://", "S3://")}},
                    headers=users["alice"])
    assert r.status_code == 201 and r.json()["checkpoint"] == newest  # a checkpoint prefix: itself


@pytest.mark.parametrize(("prefix", "words"), [
    ("{root}/empty", "neither a checkpoint (meta.json) nor a run prefix holding one"),
    ("s3://{bucket}/cv/run", "outside your team's data roots"),
    ("{root}/x/../run", "without empty, '.' or '..' components"),  # the roots would read it as {root}/run
])
def test_an_s3_prefix_without_a_checkpoint_or_outside_the_roots_is_a_422(client, users, nlp_s3, s3_bucket,
                                                                         s3_server, prefix, words):
    _s3_checkpoint(s3_server, f"s3://{s3_bucket}/cv/run/step-00000001")  # another team's
    checkpoint = prefix.format(root=nlp_s3, bucket=s3_bucket)
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": checkpoint}}, headers=users["alice"])
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"] == ["body", "spec", "checkpoint"] and words in err["msg"], err


def test_an_s3_endpoint_that_does_not_answer_is_a_503_naming_the_field(client, users, nlp_s3, s3_bucket,
                                                                        monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    r = client.post("/v1/deployments", json={"spec": {"checkpoint": f"{nlp_s3}/run"}}, headers=users["alice"])
    assert r.status_code == 503, r.text
    assert re.match(rf"spec\.checkpoint: cannot reach bucket '{s3_bucket}' .* at {dead}", r.json()["detail"])
    assert client.get("/v1/deployments", headers=users["alice"]).json()["count"] == 0  # nothing stored


def test_a_jobs_s3_checkpoint_comes_from_its_summary_else_its_checkpoint_storage(client, app, users, nlp_root,
                                                                                 nlp_s3, s3_server):
    storage = f"{nlp_s3}/store"
    job_id = _finished_job(app, spec={"name": "j", "checkpoint_storage": storage})
    final = _s3_checkpoint(s3_server, f"{storage}/ray-train/step-00000004")
    newest = _s3_checkpoint(s3_server, f"{storage}/ray-train/step-00000008")
    r = client.post("/v1/deployments", json={"job_id": job_id}, headers=users["alice"])
    assert r.status_code == 201, r.text  # no summary.json (the run ended without one): the storage's newest
    assert (r.json()["checkpoint"], r.json()["source"]) == (newest, f"job {job_id}")
    paths = job_paths(app.state.settings.job_root, job_id)
    paths.out.mkdir(parents=True)
    paths.summary.write_text(summary_json(checkpoint=final))
    r = client.post("/v1/deployments", json={"job_id": job_id}, headers=users["alice"])
    assert r.status_code == 201 and r.json()["checkpoint"] == final  # the one the run reported last

    empty = _finished_job(app, spec={"name": "j", "checkpoint_storage": f"{nlp_s3}/empty"})
    r = client.post("/v1/deployments", json={"job_id": empty}, headers=users["alice"])
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "job_id"], r.text
    assert "neither a checkpoint" in r.json()["detail"][0]["msg"]
    assert client.put("/v1/teams/nlp", json={"roots": [str(nlp_root)]}, headers=AUTH).status_code == 200
    r = client.post("/v1/deployments", json={"job_id": job_id}, headers=users["alice"])  # roots shrank since
    assert r.status_code == 422 and "outside your team's data roots" in r.json()["detail"][0]["msg"], r.text
    assert client.post("/v1/deployments", json={"job_id": job_id}, headers=AUTH).status_code == 201  # admin


def test_a_jobs_local_checkpoint_storage_is_served_and_its_own_folder_needs_no_root(client, app, users, nlp_root):
    job_id = _finished_job(app, spec={"name": "j", "checkpoint_storage": str(nlp_root / "store")})
    ckpt = _checkpoint(nlp_root / "store" / "ray-train" / "step-00000003")
    r = client.post("/v1/deployments", json={"job_id": job_id}, headers=users["alice"])
    assert r.status_code == 201 and r.json()["checkpoint"] == str(ckpt), r.text
    other = _finished_job(app)
    paths = job_paths(app.state.settings.job_root, other)
    own = _checkpoint(paths.out / "ray-train" / "step-00000005")
    paths.summary.write_text(summary_json(checkpoint=str(own)))  # inside the job's folder, not a data root
    r = client.post("/v1/deployments", json={"job_id": other}, headers=users["alice"])
    assert r.status_code == 201 and r.json()["checkpoint"] == str(own.resolve()), r.text
