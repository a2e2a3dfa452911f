"""Jobs written straight into a real store (past the API and its checks), for the unit tests of the
store and of the controller."""

from __future__ import annotations

from orchestrator.store import JobRecord, Store, submission_id_for


def create_job(store: Store, **kw) -> tuple[JobRecord, bool]:
    """A PENDING train job named ``demo`` (``kw`` overrides any field); the record and whether it is new."""
    args = {"kind": "train", "name": "demo", "spec": {"name": "demo"}, "max_retries": 1} | kw
    return store.jobs.create(**args)


def train_job(store: Store, max_retries: int = 1, name: str = "demo") -> str:
    """A PENDING 4-step train job, as the controller tests start one; its id."""
    job, _ = store.jobs.create(kind="train", name=name, spec={"name": name, "train": {"steps": 4}},
                               max_retries=max_retries)
    return job.id


def running_at_zero(env, logs=""):
    """A job its controller first sees RUNNING at t=0 of a fake clock; (job id, submission id, clock).
    ``env``: the controller tests' (store, fake Ray, controller, settings)."""
    store, ray, ctl, settings = env
    now = [0.0]
    ctl.clock = lambda: now[0]
    jid = train_job(store)
    for _ in range(2):
        ctl.reconcile_once()
    sid = submission_id_for(jid, 1)
    ray.set(sid, "RUNNING")
    ray.job_logs[sid] = logs
    ctl.reconcile_once()
    return jid, sid, now
