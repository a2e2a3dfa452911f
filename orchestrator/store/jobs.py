"""``store.jobs``: jobs, their state history, their attempts, their queue places, resize requests and
preemption counts (SQLAlchemy Core). ``transition`` is the one place a job changes state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, func, select
from sqlalchemy.exc import IntegrityError

from orchestrator.states import JobState, check_transition
from orchestrator.store.records import (
    EventRecord,
    IdempotencyConflict,
    JobNotFound,
    JobRecord,
    ResizeConflict,
    job_from_rows,
    new_job_id,
    submission_id_for,
)
from orchestrator.store.tables import attempts_t, events_t, jobs_t
from orchestrator.store.transactions import Transactions


class JobRepository:
    def __init__(self, tx: Transactions):
        self._tx = tx

    # -- reads ------------------------------------------------------------------------------------

    def _load(self, conn: Connection, job_id: str, lock: bool = False) -> JobRecord:
        q = select(jobs_t).where(jobs_t.c.id == job_id)
        row = conn.execute(q.with_for_update() if lock and self._tx.locks_rows else q).first()
        if row is None:
            raise JobNotFound(job_id)
        events = conn.execute(select(events_t).where(events_t.c.job_id == job_id).order_by(events_t.c.seq))
        attempts = conn.execute(select(attempts_t).where(attempts_t.c.job_id == job_id).order_by(attempts_t.c.number))
        return job_from_rows(row, events.all(), attempts.all())

    def get(self, job_id: str) -> JobRecord:
        with self._tx(write=False) as conn:
            return self._load(conn, job_id)

    def list(self, states: Iterable[JobState] = (), limit: int = 100, offset: int = 0,
             team: str | None = None, kind: str | None = None) -> tuple[list[JobRecord], int]:
        """Jobs newest first (without history), and how many match in all; ``team``: that team's only;
        ``kind``: of that kind only."""
        states = [s.value for s in states]
        conds = ([jobs_t.c.state.in_(states)] if states else []) + ([jobs_t.c.team == team] if team is not None else [])
        conds += [jobs_t.c.kind == kind] if kind is not None else []
        q = select(jobs_t).order_by(jobs_t.c.created_at.desc(), jobs_t.c.id).limit(limit).offset(offset)
        count_q = select(func.count()).select_from(jobs_t)
        if conds:
            q, count_q = q.where(*conds), count_q.where(*conds)
        with self._tx(write=False) as conn:
            return [job_from_rows(r) for r in conn.execute(q)], conn.execute(count_q).scalar_one()

    def unfinished(self) -> list[JobRecord]:
        """Every non-terminal job with its attempts, oldest first: the controller's work list."""
        open_states = [s.value for s in JobState if not s.terminal]
        with self._tx(write=False) as conn:
            ids = conn.execute(
                select(jobs_t.c.id).where(jobs_t.c.state.in_(open_states)).order_by(jobs_t.c.created_at, jobs_t.c.id)
            ).scalars().all()
            return [self._load(conn, i) for i in ids]

    def count_by_state(self, team: str | None = None) -> dict[JobState, int]:
        """How many jobs are in each state; ``team``: that team's only."""
        q = select(jobs_t.c.state, func.count()).group_by(jobs_t.c.state)
        with self._tx(write=False) as conn:
            rows = conn.execute(q.where(jobs_t.c.team == team) if team is not None else q).all()
        counts = {s: 0 for s in JobState}
        counts.update({JobState(s): n for s, n in rows})
        return counts

    def unfinished_ids(self, team: str) -> set[str]:
        """Ids of the team's non-terminal jobs (ids only: ``/metrics`` asks at every scrape)."""
        open_states = [s.value for s in JobState if not s.terminal]
        q = select(jobs_t.c.id).where(jobs_t.c.team == team, jobs_t.c.state.in_(open_states))
        with self._tx(write=False) as conn:
            return set(conn.execute(q).scalars())

    # -- writes -----------------------------------------------------------------------------------

    def create(
        self,
        *,
        kind: str,
        name: str,
        spec: dict[str, Any],
        max_retries: int,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        team: str = "admin",
        owner: str = "admin",
        priority: str = "normal",
    ) -> tuple[JobRecord, bool]:
        """Store a new PENDING job; with an idempotency key already used, the existing job and False.
        (Keys are global: the caller hashes its principal into ``request_hash``, so another user's key
        is a conflict, never their job.)"""
        now = time.time()
        job_id = new_job_id()
        try:
            with self._tx() as conn:
                if idempotency_key is not None:
                    existing = self._by_key(conn, idempotency_key, request_hash)
                    if existing is not None:
                        return existing, False
                conn.execute(jobs_t.insert().values(
                    id=job_id, kind=kind, name=name, state=JobState.PENDING.value, spec=json.dumps(spec),
                    max_retries=max_retries, attempts=0, cancel_requested=False, idempotency_key=idempotency_key,
                    request_hash=request_hash, created_at=now, updated_at=now, message="accepted",
                    team=team, owner=owner, priority=priority,
                ))
                conn.execute(events_t.insert().values(
                    job_id=job_id, seq=1, from_state=None, to_state=JobState.PENDING.value, reason="accepted", at=now
                ))
            # What was just written, without reading it back (the submit path is latency-bound).
            return JobRecord(
                id=job_id, kind=kind, name=name, state=JobState.PENDING, spec=spec, max_retries=max_retries,
                attempts=0, cancel_requested=False, idempotency_key=idempotency_key, request_hash=request_hash,
                metrics=None, metrics_at=None, message="accepted", created_at=now, updated_at=now,
                team=team, owner=owner, priority=priority,
                events=(EventRecord(1, None, JobState.PENDING, "accepted", now),),
            ), True
        except IntegrityError:
            # Another writer stored the same key between our look and our insert (non-SQLite databases).
            if idempotency_key is None:
                raise
            with self._tx(write=False) as conn:
                existing = self._by_key(conn, idempotency_key, request_hash)
            if existing is None:
                raise
            return existing, False

    def _by_key(self, conn: Connection, key: str, request_hash: str | None) -> JobRecord | None:
        job_id = conn.execute(select(jobs_t.c.id).where(jobs_t.c.idempotency_key == key)).scalar()
        if job_id is None:
            return None
        job = self._load(conn, job_id)
        if job.request_hash != request_hash:
            raise IdempotencyConflict("this Idempotency-Key was used with a different request body")
        return job

    def transition(self, job_id: str, target: JobState, reason: str, *, new_attempt: bool = False) -> JobRecord:
        """The one place a job changes state: check the move, store it with its reason, and (moving to
        STARTING) store the next attempt with its derived Ray submission id, all in one transaction.
        Leaving RESIZING for QUEUED stores the size asked for (``resize_spec`` becomes the spec) and
        counts the resize; leaving it otherwise (the job ended first) drops the request."""
        now = time.time()
        with self._tx() as conn:
            job = self._load(conn, job_id, lock=True)
            check_transition(job.state, target)
            values: dict[str, Any] = {"state": target.value, "message": reason, "updated_at": now}
            if job.state is JobState.RESIZING:
                values["resize_spec"] = None
                if target is JobState.QUEUED and job.resize_spec is not None:
                    values.update(spec=json.dumps(job.resize_spec), resizes=job.resizes + 1)
            if new_attempt:
                number = job.attempts + 1
                values["attempts"] = number
                conn.execute(attempts_t.insert().values(
                    job_id=job_id, number=number, submission_id=submission_id_for(job_id, number), created_at=now
                ))
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(**values))
            seq = (job.events[-1].seq if job.events else 0) + 1
            conn.execute(events_t.insert().values(
                job_id=job_id, seq=seq, from_state=job.state.value, to_state=target.value, reason=reason, at=now
            ))
            return self._load(conn, job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Record a cancel request (the controller acts on it); a terminal job is returned unchanged."""
        with self._tx() as conn:
            job = self._load(conn, job_id, lock=True)
            if job.state.terminal or job.cancel_requested:
                return job
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(cancel_requested=True, updated_at=time.time()))
            return self._load(conn, job_id)

    def update_attempt(self, job_id: str, number: int, **values: Any) -> None:
        allowed = {"submitted_at", "ended_at", "ray_status", "ray_message", "exit_code"}
        if not values.keys() <= allowed:
            raise ValueError(f"not attempt fields: {sorted(values.keys() - allowed)}")
        with self._tx() as conn:
            conn.execute(
                attempts_t.update()
                .where(attempts_t.c.job_id == job_id, attempts_t.c.number == number)
                .values(**values)
            )

    def set_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        with self._tx() as conn:
            conn.execute(
                jobs_t.update().where(jobs_t.c.id == job_id).values(metrics=json.dumps(metrics), metrics_at=time.time())
            )

    def set_queue(self, job_id: str, position: int | None, reason: str | None) -> None:
        """A QUEUED job's place and why it waits (None, None: not queued). One UPDATE, no read, and
        ``updated_at`` is left alone: the scheduler rewrites these on every pass."""
        self.set_queue_many([(job_id, position, reason)])

    def set_queue_many(self, entries: Iterable[tuple[str, int | None, str | None]]) -> None:
        """``set_queue`` for many jobs in one transaction (one executemany): a pass over a long queue."""
        rows = [{"job": j, "position": p, "reason": r} for j, p, r in entries]
        if not rows:
            return
        stmt = (jobs_t.update().where(jobs_t.c.id == bindparam("job"))
                .values(queue_position=bindparam("position"), queue_reason=bindparam("reason")))
        with self._tx() as conn:
            conn.execute(stmt, rows)

    def request_resize(self, job_id: str, spec: dict[str, Any]) -> JobRecord:
        """Ask for ``spec`` (the job's spec at a new size). A job not yet started (PENDING, QUEUED) takes
        it at once: its next admission books the new demand. A RUNNING or RESIZING job keeps it in
        ``resize_spec`` until the controller has stopped it (the last request wins; asking for the size
        it runs at withdraws the request). Any other state: ``ResizeConflict``."""
        with self._tx() as conn:
            job = self._load(conn, job_id, lock=True)
            values: dict[str, Any]
            if job.state in (JobState.PENDING, JobState.QUEUED):
                values = {"spec": json.dumps(spec), "resize_spec": None}
            elif job.state in (JobState.RUNNING, JobState.RESIZING):
                values = {"resize_spec": None if spec == job.spec else json.dumps(spec)}
            else:
                raise ResizeConflict(f"job {job_id} is {job.state.value}: only a PENDING, QUEUED, RUNNING or "
                                     "RESIZING job can be resized")
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(**values, updated_at=time.time()))
            return self._load(conn, job_id)

    def add_preemption(self, job_id: str) -> JobRecord:
        """Count one more preemption of the job (the scheduler stopped it for a higher priority)."""
        with self._tx() as conn:
            job = self._load(conn, job_id, lock=True)
            conn.execute(jobs_t.update().where(jobs_t.c.id == job_id)
                         .values(preemptions=job.preemptions + 1, updated_at=time.time()))
            return self._load(conn, job_id)
