"""/v1/jobs/{id}/curve: a job's training curve, read back from the ``[progress]`` lines of its
drivers' logs (one per attempt). The dashboard's loss chart needs the history; the stored job keeps
only the latest record, and the log already is the durable history, so no second store of metrics.

Read incrementally: this process remembers, per attempt, how far its log was parsed and the points
kept so far (thinned as they come, so at most ``MAX_CURVE_POINTS`` each), and a poll reads only
what the driver wrote since the last one. Its cost follows what was written since, not the job's
age; the first poll after a restart of the service reads each log once, in bounded pieces.

Torch-free: the line format comes from ``jobs.contracts.training.ProgressRecord``. Authorization is the jobs
routes' own (``VisibleJob``): another team's job is a 404 like a missing one.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from jobs.contracts.training import ProgressRecord
from orchestrator.api.deps import JOB_NOT_FOUND, RayDep, VisibleJob
from orchestrator.api.schemas.base import Problem
from orchestrator.ray_client import RayJobs, RayUnavailable
from orchestrator.store import JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Points per answer: a long run logged every step would otherwise send (and the page draw) millions.
# Beyond it every n-th point of each attempt is kept, and always its last one.
MAX_CURVE_POINTS = 4000
CURVE_READ_BYTES = 4 * 1024 * 1024  # one read of a log
CURVE_POLL_BYTES = 64 * 1024 * 1024  # the most one poll reads of one attempt's log; the next goes on
CACHED_ATTEMPTS = 64  # attempts whose curve this process remembers (the least recently polled go first)


class CurvePoint(BaseModel):
    """One progress record. A figure the worker reported as NaN or infinite is null (JSON has neither)."""

    model_config = ConfigDict(extra="forbid")

    attempt: int
    step: int
    loss: float | None
    lr: float | None
    tokens_per_s: float | None
    compression: float | None
    max_vio: float | None


class JobCurve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    total_steps: int | None  # of the latest attempt's run; None before its first record
    points: list[CurvePoint]  # by attempt, then in log order (a resumed attempt may repeat steps)
    sampled: bool  # True when points were thinned to MAX_CURVE_POINTS


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def parse_records(logs: str) -> list[ProgressRecord]:
    """The progress records in one attempt's log, in order; other lines are skipped."""
    return [r for r in map(ProgressRecord.from_line, logs.splitlines()) if r is not None]


def _point(attempt: int, r: ProgressRecord) -> CurvePoint:
    return CurvePoint(attempt=attempt, step=r.step, loss=_finite(r.loss), lr=_finite(r.lr),
                      tokens_per_s=_finite(r.tokens_per_s), compression=_finite(r.compression),
                      max_vio=_finite(r.max_vio))


def thin(points: list[CurvePoint], limit: int) -> list[CurvePoint]:
    """Every n-th point (n the smallest that fits ``limit``), keeping the last: its loss is the latest."""
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / max(limit - 1, 1))
    return [*points[:-1:stride], points[-1]]


@dataclass
class AttemptCurve:
    """One attempt's curve so far: its records' every ``stride``-th point (and the last), and the byte
    offset where its log's next unread line starts."""
    offset: int = 0
    count: int = 0  # records parsed
    stride: int = 1
    kept: list[tuple[int, CurvePoint]] = field(default_factory=list)  # (record index, point)
    last: ProgressRecord | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # one reader at a time

    def reset(self) -> None:
        self.offset = self.count = 0
        self.stride, self.kept, self.last = 1, [], None

    def add(self, attempt: int, record: ProgressRecord) -> None:
        if self.count % self.stride == 0:
            self.kept.append((self.count, _point(attempt, record)))
            if len(self.kept) > MAX_CURVE_POINTS:  # halve: every 2*stride-th record stays
                self.stride *= 2
                self.kept = [(i, p) for i, p in self.kept if i % self.stride == 0]
        self.count += 1
        self.last = record

    def points(self, attempt: int) -> list[CurvePoint]:
        """The kept points and the latest one (its loss is the current one)."""
        if self.last is None:
            return []
        tail = [] if self.kept and self.kept[-1][0] == self.count - 1 else [_point(attempt, self.last)]
        return [p for _, p in self.kept] + tail

    def snapshot(self, attempt: int, unfinished: ProgressRecord | None) -> tuple[int, list[CurvePoint],
                                                                              ProgressRecord | None]:
        """(records, points, latest record), counting a record on the log's unterminated last line,
        which is not kept: the line may still be being written, and is parsed again next time."""
        if unfinished is None:
            return self.count, self.points(attempt), self.last
        return self.count + 1, [p for _, p in self.kept] + [_point(attempt, unfinished)], unfinished


class CurveCache:
    """The attempts' curves this process has read, by Ray submission id."""

    def __init__(self, capacity: int = CACHED_ATTEMPTS):
        self.capacity = capacity
        self._curves: OrderedDict[str, AttemptCurve] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, ray: RayJobs, submission_id: str, attempt: int) -> tuple[int, list[CurvePoint], ProgressRecord | None]:
        """The attempt's records so far: how many, the kept points, the latest record."""
        with self._lock:
            curve = self._curves.pop(submission_id, None) or AttemptCurve()
            self._curves[submission_id] = curve
            while len(self._curves) > self.capacity:
                self._curves.popitem(last=False)
        with curve.lock:
            budget, unfinished = CURVE_POLL_BYTES, None
            while budget > 0:
                part = ray.read_log(submission_id, curve.offset, min(CURVE_READ_BYTES, budget))
                if part.size < curve.offset:  # not the log that was read (a new cluster): start over
                    curve.reset()
                    continue
                text, curve.offset = part.whole_lines()
                for record in parse_records(text):
                    curve.add(attempt, record)
                budget -= len(part.data)
                if part.end >= part.size or not part.data:
                    unfinished = ProgressRecord.from_line(part.data[curve.offset - part.start:].decode(errors="replace"))
                    break
            return curve.snapshot(attempt, unfinished)


def read_curve(job: JobRecord, ray: RayJobs, cache: CurveCache) -> JobCurve:
    """Every submitted attempt's points, each attempt thinned to its share of ``MAX_CURVE_POINTS``."""
    curves = [cache.read(ray, a.submission_id, a.number)
              for a in job.attempt_records if a.submitted_at is not None]
    total = sum(count for count, _, _ in curves)
    points: list[CurvePoint] = []
    for count, kept, _ in curves:
        share = max(1, MAX_CURVE_POINTS * count // total) if total else 0
        points.extend(thin(kept, share))
    latest = next((last for _, _, last in reversed(curves) if last is not None), None)
    return JobCurve(job_id=job.id, total_steps=latest.total_steps if latest else None, points=points,
                    sampled=len(points) < total)


_cache_lock = threading.Lock()


def _cache(request: Request) -> CurveCache:
    """The app's curve cache, made on first use (one per app: tests run several in one process)."""
    with _cache_lock:
        if not hasattr(request.app.state, "curves"):
            request.app.state.curves = CurveCache()
        return request.app.state.curves


@router.get("/{job_id}/curve", response_model=JobCurve,
            responses={**JOB_NOT_FOUND, 503: {"model": Problem, "description": "Ray is not reachable"}})
async def job_curve(job: VisibleJob, ray: RayDep, request: Request) -> JobCurve:
    """Step, loss, learning rate, throughput, compression and MaxVio of each progress record of each
    attempt (empty before the first record)."""
    try:
        return await run_in_threadpool(read_curve, job, ray, _cache(request))
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
