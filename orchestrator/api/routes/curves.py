"""/v1/jobs/{id}/curve: a job's training curve, read back from the ``[progress]`` lines of its
drivers' logs (one per attempt). The dashboard's loss chart needs the history; the stored job keeps
only the latest record, and the log already is the durable history, so no second store of metrics.

Torch-free: the line format comes from ``jobs.contracts.ProgressRecord``. Authorization is the jobs
routes' own (``_get``): another team's job is a 404 like a missing one.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

from jobs.contracts import ProgressRecord
from orchestrator.api.deps import PrincipalDep, RayDep, StoreDep
from orchestrator.api.routes.jobs import _NOT_FOUND, JobId, _get
from orchestrator.api.schemas import Problem
from orchestrator.ray_client import RayJobs, RayUnavailable
from orchestrator.store import JobRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# Points per answer: a long run logged every step would otherwise send (and the page draw) millions.
# Beyond it every n-th point of each attempt is kept, and always its last one.
MAX_CURVE_POINTS = 4000


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


def read_curve(job: JobRecord, ray: RayJobs) -> JobCurve:
    """Every submitted attempt's records, each attempt thinned to its share of ``MAX_CURVE_POINTS``."""
    records = [(a.number, parse_records(ray.logs(a.submission_id)))
               for a in job.attempt_records if a.submitted_at is not None]
    total = sum(len(rs) for _, rs in records)
    points: list[CurvePoint] = []
    for attempt, rs in records:
        share = max(1, MAX_CURVE_POINTS * len(rs) // total) if total else 0
        points.extend(thin([_point(attempt, r) for r in rs], share))
    latest = next((rs[-1] for _, rs in reversed(records) if rs), None)
    return JobCurve(job_id=job.id, total_steps=latest.total_steps if latest else None, points=points,
                    sampled=len(points) < total)


@router.get("/{job_id}/curve", response_model=JobCurve,
            responses={**_NOT_FOUND, 503: {"model": Problem, "description": "Ray is not reachable"}})
async def job_curve(job_id: JobId, store: StoreDep, ray: RayDep, principal: PrincipalDep) -> JobCurve:
    """Step, loss, learning rate, throughput, compression and MaxVio of each progress record of each
    attempt (empty before the first record)."""
    job = await run_in_threadpool(_get, store, job_id, principal)
    try:
        return await run_in_threadpool(read_curve, job, ray)
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
