"""/v1/jobs/{id}/logs: a bounded tail of a driver's log, pages of what came before it, or a stream that
follows the job for at most ``ORCH_FOLLOW_MAX_S``.

A driver's log grows without bound (``log_every: 1`` over millions of steps), so no answer holds it
whole: a read returns at most ``tail`` bytes (``DEFAULT_TAIL_BYTES`` unless asked), says where they
start in the log and whether earlier output exists, and ``before=<start>`` pages back from there.
Authorization is the jobs routes' (``VisibleJob``): another team's job is a 404 like a missing one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict

from orchestrator.api.deps import JOB_NOT_FOUND, RayDep, SettingsDep, StoreDep, VisibleJob
from orchestrator.api.schemas.base import Problem
from orchestrator.ray_client import LogSlice, RayJobs, RayUnavailable
from orchestrator.store import Store

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

DEFAULT_TAIL_BYTES = 256 * 1024  # what one read returns unless asked: a few thousand lines
MAX_TAIL_BYTES = 4 * 1024 * 1024  # the most one read returns
MAX_LOG_OFFSET = 1 << 50  # bytes; a bound for ``before`` far above any log
FOLLOW_POLL_S = 0.5  # how often a follow stream looks for a new attempt or the job's end


class JobLogs(BaseModel):
    """Bytes ``[start, end)`` of one attempt's driver log, as text (undecodable bytes replaced)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    attempt: int | None  # None: no attempt yet
    ray_submission_id: str | None
    logs: str  # begins at a line start unless one line is longer than the whole read
    start: int  # byte offset of the first byte of ``logs`` in the log
    end: int  # byte offset just after its last byte
    size: int  # the log's length in bytes when read
    truncated: bool  # earlier output exists: ask again with before=<start> for the page before


Tail = Annotated[int, Query(ge=1, le=MAX_TAIL_BYTES, description=(
    "bytes of the log to return, at most: its last ones, or those just before `before`; with follow=true, "
    "of what each attempt had already written when the stream opened"))]
Before = Annotated[int | None, Query(ge=0, le=MAX_LOG_OFFSET, description=(
    "page back: the bytes ending at this offset (a previous answer's `start`) instead of the log's end"))]


@router.get(
    "/{job_id}/logs", response_model=JobLogs,
    responses={**JOB_NOT_FOUND, 200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                   "description": "JSON, or with follow=true a text stream (see the route)"},
               503: {"model": Problem, "description": "Ray is not reachable"}},
)
async def job_logs(
    job: VisibleJob, store: StoreDep, ray: RayDep, settings: SettingsDep,
    follow: Annotated[bool, Query(description="stream text as the job writes it (see the route)")] = False,
    attempt: Annotated[int | None, Query(ge=1, le=1000)] = None,
    tail: Tail = DEFAULT_TAIL_BYTES,
    before: Before = None,
) -> JobLogs | StreamingResponse:
    """The last ``tail`` bytes of one attempt's driver log (the latest attempt by default), or with
    ``before`` the ``tail`` bytes before that offset. ``truncated`` says earlier output exists.

    ``follow=true`` answers ``text/plain`` that stays open while the job runs: each attempt from
    ``attempt`` (default 1) on, its already written part cut to its last ``tail`` bytes (a
    ``[... N earlier bytes ...]`` line says so), then its output as it comes. The stream ends when the
    job ends, and in any case after the server's ``ORCH_FOLLOW_MAX_S`` (default one hour). A quiet job
    sends nothing for long stretches: read it as a stream without a read timeout (``curl -N``, httpx
    ``stream(..., timeout=None)``), or poll without ``follow``."""
    job_id = job.id
    if follow:
        return StreamingResponse(_follow(store, ray, job_id, attempt or 1, tail, settings.follow_max_s),
                                 media_type="text/plain; charset=utf-8")
    record = job.current_attempt if attempt is None else next(
        (a for a in job.attempt_records if a.number == attempt), None)
    if attempt is not None and record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no attempt {attempt}")
    if record is None or record.submitted_at is None:
        return JobLogs(job_id=job_id, attempt=record.number if record else None,
                       ray_submission_id=record.submission_id if record else None, logs="", start=0, end=0, size=0,
                       truncated=False)
    try:
        part = await run_in_threadpool(_read, ray, record.submission_id, tail, before)
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(e)) from None
    return JobLogs(job_id=job_id, attempt=record.number, ray_submission_id=record.submission_id,
                   logs=part.data.decode(errors="replace"), start=part.start, end=part.end, size=part.size,
                   truncated=part.start > 0)


def _read(ray: RayJobs, submission_id: str, tail: int, before: int | None) -> LogSlice:
    """The last ``tail`` bytes of the log, or of its first ``before`` bytes, from a line start."""
    if before is None:
        part = ray.read_log(submission_id, None, tail)
    else:
        part = ray.read_log(submission_id, max(0, before - tail), min(tail, before))
    return _from_line_start(part)


def _from_line_start(part: LogSlice) -> LogSlice:
    """Drop the cut line a slice from the middle of a log begins with (unless it is all there is)."""
    cut = part.data.find(b"\n") + 1 if part.start > 0 else 0
    if cut == 0 or cut == len(part.data):
        return part
    return LogSlice(part.data[cut:], part.start + cut, part.size)


async def _follow(store: Store, ray: RayJobs, job_id: str, first_attempt: int, tail: int,
                  max_s: float) -> AsyncIterator[str]:
    """Tail each attempt from ``first_attempt`` on until the job ends or ``max_s`` passes. What an
    attempt had written before the stream opened is cut to its last ``tail`` bytes; a tail that
    breaks while its attempt still runs is reopened, skipping what was already sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_s
    sent: dict[int, int] = {}  # attempt -> bytes of its log already streamed (or skipped)
    done: set[int] = set()
    while loop.time() < deadline:
        job = await run_in_threadpool(store.jobs.get, job_id)
        for a in job.attempt_records:
            if a.number < first_attempt or a.number in done or a.submitted_at is None:
                continue
            if a.number not in sent:  # seen for the first time: only the end of what it already wrote
                try:
                    start = (await run_in_threadpool(_read, ray, a.submission_id, tail, None)).start
                except RayUnavailable:
                    continue  # tried again next pass
                if a.number > 1:
                    yield f"--- attempt {a.number} ({a.submission_id}) ---\n"
                sent[a.number] = start
                if start:
                    yield f"[... {start} earlier bytes of attempt {a.number} not shown ...]\n"
            skip = sent[a.number]
            async for chunk in _bounded(ray.tail(a.submission_id), deadline):
                data = chunk.encode()
                if skip >= len(data):
                    skip -= len(data)
                    continue
                data, skip = data[skip:], 0
                sent[a.number] += len(data)
                yield data.decode(errors="replace")
            if a.ended_at is not None or job.state.terminal or a.number < job.attempts:
                done.add(a.number)
        if job.state.terminal and all(a.number in done or a.number < first_attempt or a.submitted_at is None
                                      for a in job.attempt_records):
            return
        await asyncio.sleep(FOLLOW_POLL_S)


async def _bounded(chunks: AsyncIterator[str], deadline: float) -> AsyncIterator[str]:
    """``chunks`` until the deadline: a quiet tail cannot hold the stream past it."""
    loop = asyncio.get_running_loop()
    it = chunks.__aiter__()
    try:
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                yield await asyncio.wait_for(it.__anext__(), remaining)
            except (StopAsyncIteration, asyncio.TimeoutError):
                return
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()
