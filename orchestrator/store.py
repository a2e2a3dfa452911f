"""The durable job store: jobs, their state history and their attempts (SQLAlchemy Core).

SQLite (WAL mode, ``synchronous=FULL`` unless ORCH_SQLITE_SYNCHRONOUS=NORMAL) by default; any SQLAlchemy URL works. Every write runs in one
transaction that takes the write lock first (``BEGIN IMMEDIATE`` on SQLite, ``SELECT ... FOR UPDATE``
elsewhere), so a state check and the move it allows cannot interleave with another writer's.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError

from orchestrator.migrations import migrate
from orchestrator.states import JobState, check_transition

# Query-side view of the schema that orchestrator/migrations.py creates (keep the two in step).
_md = MetaData()
jobs_t = Table(
    "jobs", _md,
    Column("id", String(32), primary_key=True),
    Column("kind", String(16)),
    Column("name", String(64)),
    Column("state", String(16)),
    Column("spec", Text),
    Column("max_retries", Integer),
    Column("attempts", Integer),
    Column("cancel_requested", Boolean),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64)),
    Column("metrics", Text),
    Column("metrics_at", Float),
    Column("message", Text),
    Column("created_at", Float),
    Column("updated_at", Float),
)
events_t = Table(
    "job_events", _md,
    Column("job_id", String(32), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("reason", Text),
    Column("at", Float),
)
attempts_t = Table(
    "attempts", _md,
    Column("job_id", String(32), primary_key=True),
    Column("number", Integer, primary_key=True),
    Column("submission_id", String(128)),
    Column("created_at", Float),
    Column("submitted_at", Float),
    Column("ended_at", Float),
    Column("ray_status", String(16)),
    Column("ray_message", Text),
    Column("exit_code", Integer),
)

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers queue behind each other this long before failing


def submission_id_for(job_id: str, attempt: int) -> str:
    """Ray's submission id for one attempt, derived from the job id: a resubmission after a crash
    reuses it, and Ray refuses a second job under the same id."""
    return f"orch-{job_id}-{attempt}"


def new_job_id() -> str:
    return secrets.token_hex(6)  # 48 random bits, 12 characters; the primary key catches a clash


class JobNotFound(KeyError):
    pass


class IdempotencyConflict(ValueError):
    """An Idempotency-Key reused with a different request body."""


@dataclass(frozen=True)
class EventRecord:
    seq: int
    from_state: JobState | None
    to_state: JobState
    reason: str
    at: float


@dataclass(frozen=True)
class AttemptRecord:
    number: int
    submission_id: str
    created_at: float
    submitted_at: float | None
    ended_at: float | None
    ray_status: str | None
    ray_message: str | None
    exit_code: int | None


@dataclass(frozen=True)
class JobRecord:
    id: str
    kind: str
    name: str
    state: JobState
    spec: dict[str, Any]
    max_retries: int
    attempts: int
    cancel_requested: bool
    idempotency_key: str | None
    request_hash: str | None
    metrics: dict[str, Any] | None
    metrics_at: float | None
    message: str | None
    created_at: float
    updated_at: float
    events: tuple[EventRecord, ...] = ()
    attempt_records: tuple[AttemptRecord, ...] = ()

    @property
    def current_attempt(self) -> AttemptRecord | None:
        return self.attempt_records[-1] if self.attempt_records else None

    @property
    def retries_left(self) -> int:
        return self.max_retries - max(self.attempts - 1, 0)


def _job(row: Any, events: Iterable[Any] = (), attempts: Iterable[Any] = ()) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"], kind=m["kind"], name=m["name"], state=JobState(m["state"]), spec=json.loads(m["spec"]),
        max_retries=m["max_retries"], attempts=m["attempts"], cancel_requested=bool(m["cancel_requested"]),
        idempotency_key=m["idempotency_key"], request_hash=m["request_hash"],
        metrics=json.loads(m["metrics"]) if m["metrics"] else None, metrics_at=m["metrics_at"],
        message=m["message"], created_at=m["created_at"], updated_at=m["updated_at"],
        events=tuple(
            EventRecord(e.seq, JobState(e.from_state) if e.from_state else None, JobState(e.to_state), e.reason, e.at)
            for e in events
        ),
        attempt_records=tuple(AttemptRecord(**{k: a._mapping[k] for k in AttemptRecord.__annotations__}) for a in attempts),
    )


def _sqlite_engine(url: str, synchronous: str) -> Engine:
    path = url.split("sqlite:///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # The driver's own transaction handling is off; SQLAlchemy's "begin" event below issues BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit survives power loss; NORMAL (WAL): it survives a process crash, and commits
        # skip the fsync (several times the write throughput on slow disks).
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class JobStore:
    def __init__(self, url: str, sqlite_synchronous: str = "FULL"):
        if sqlite_synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, got {sqlite_synchronous!r}")
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock = threading.Lock()
        self.engine = _sqlite_engine(url, sqlite_synchronous) if self.is_sqlite else create_engine(url, pool_pre_ping=True)
        with self._tx() as conn:
            migrate(conn)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Connection]:
        if write and self.is_sqlite:
            # Writers of this process queue on a fair lock rather than in SQLite's busy handler, which
            # sleeps in growing steps (up to 100 ms) and makes the latency tail long. Other processes
            # still meet busy_timeout.
            with self._write_lock, self.engine.connect().execution_options(write=True) as conn, conn.begin():
                yield conn
            return
        with self.engine.connect().execution_options(write=write) as conn, conn.begin():
            yield conn

    # -- reads ------------------------------------------------------------------------------------

    def _load(self, conn: Connection, job_id: str, lock: bool = False) -> JobRecord:
        q = select(jobs_t).where(jobs_t.c.id == job_id)
        row = conn.execute(q.with_for_update() if lock and not self.is_sqlite else q).first()
        if row is None:
            raise JobNotFound(job_id)
        events = conn.execute(select(events_t).where(events_t.c.job_id == job_id).order_by(events_t.c.seq))
        attempts = conn.execute(select(attempts_t).where(attempts_t.c.job_id == job_id).order_by(attempts_t.c.number))
        return _job(row, events.all(), attempts.all())

    def get(self, job_id: str) -> JobRecord:
        with self._tx(write=False) as conn:
            return self._load(conn, job_id)

    def list(self, states: Iterable[JobState] = (), limit: int = 100, offset: int = 0) -> tuple[list[JobRecord], int]:
        """Jobs newest first (without history), and how many match in all."""
        states = [s.value for s in states]
        cond = jobs_t.c.state.in_(states) if states else None
        q = select(jobs_t).order_by(jobs_t.c.created_at.desc(), jobs_t.c.id).limit(limit).offset(offset)
        count_q = select(func.count()).select_from(jobs_t)
        if cond is not None:
            q, count_q = q.where(cond), count_q.where(cond)
        with self._tx(write=False) as conn:
            return [_job(r) for r in conn.execute(q)], conn.execute(count_q).scalar_one()

    def unfinished(self) -> list[JobRecord]:
        """Every non-terminal job with its attempts, oldest first: the controller's work list."""
        open_states = [s.value for s in JobState if not s.terminal]
        with self._tx(write=False) as conn:
            ids = conn.execute(
                select(jobs_t.c.id).where(jobs_t.c.state.in_(open_states)).order_by(jobs_t.c.created_at, jobs_t.c.id)
            ).scalars().all()
            return [self._load(conn, i) for i in ids]

    def count_by_state(self) -> dict[JobState, int]:
        with self._tx(write=False) as conn:
            rows = conn.execute(select(jobs_t.c.state, func.count()).group_by(jobs_t.c.state)).all()
        counts = {s: 0 for s in JobState}
        counts.update({JobState(s): n for s, n in rows})
        return counts

    def ping(self) -> None:
        with self._tx(write=False) as conn:
            conn.exec_driver_sql("SELECT 1")

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
    ) -> tuple[JobRecord, bool]:
        """Store a new PENDING job; with an idempotency key already used, the existing job and False."""
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
                ))
                conn.execute(events_t.insert().values(
                    job_id=job_id, seq=1, from_state=None, to_state=JobState.PENDING.value, reason="accepted", at=now
                ))
            # What was just written, without reading it back (the submit path is latency-bound).
            return JobRecord(
                id=job_id, kind=kind, name=name, state=JobState.PENDING, spec=spec, max_retries=max_retries,
                attempts=0, cancel_requested=False, idempotency_key=idempotency_key, request_hash=request_hash,
                metrics=None, metrics_at=None, message="accepted", created_at=now, updated_at=now,
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
        STARTING) store the next attempt with its derived Ray submission id, all in one transaction."""
        now = time.time()
        with self._tx() as conn:
            job = self._load(conn, job_id, lock=True)
            check_transition(job.state, target)
            values: dict[str, Any] = {"state": target.value, "message": reason, "updated_at": now}
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
