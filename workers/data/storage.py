"""One way to reach a local folder or an ``s3://`` prefix: ``open_fs(uri) -> (filesystem, path)``.

S3 settings come from the environment, as every AWS tool reads them: ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``; an S3-compatible store such as MinIO, or moto in the tests),
``AWS_REGION`` (or ``AWS_DEFAULT_REGION``), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(or any other source of the AWS credential chain). The filesystem is built with explicit timeouts
and a small retry budget rather than by ``FileSystem.from_uri``: both build the same S3 client
from the same variables (``S3FileSystem()`` without an endpoint would ignore AWS_ENDPOINT_URL,
arrow#49643, hence it is passed), but an URI cannot carry timeouts, and an unreachable endpoint
must end in an error within seconds instead of stalling a job. ``open_fs`` then probes the path,
retrying with backoff, and raises ONE ``StorageError`` naming the bucket and endpoint.

A local file is read or written here only under the job's data roots when it is opened
(workers/confine.py, ``ORCH_DATA_ROOTS``; unset: anywhere): a link out of them raises
``OutsideRoots`` naming the file, never retried. S3 keys have no links.

Two S3 clients, each where it is the better one (docs/data.md, "S3"; measured side by side by
``python -m tests.bench --sections data``):

- pyarrow's own ``S3FileSystem`` (``open_fs``) on the hot path: every shard a read task reads,
  every shard a preparation writes. Its reads of whole row groups were faster than s3fs's, and
  Ray Data and Ray Train take it as it is.
- s3fs (fsspec, on botocore) for the credential chain and for listing and small objects
  (``open_small_fs``: a source's listing, manifests). botocore resolves what users configured for
  every other AWS tool: ``AWS_PROFILE`` / named profiles in ``~/.aws/config``, SSO logins,
  ``credential_process``, assumed roles. The keys it resolves on the driver are handed to both
  clients (``_credentials``), so a read task on a node without the user's ``~/.aws`` uses them too.

Ray pickles a filesystem handed to it (Ray Data's readers, Ray Train's storage) into other
processes; the endpoint, region, timeouts and the resolved keys travel with it, so those processes
reach the same bucket whatever their own environment. Keys of a temporary session (SSO, a role)
last as long as that session.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from workers import confine
from workers.confine import OutsideRoots

# The S3 client's own bounds: connect and per-request (stall) timeouts, attempts per request.
S3_CONNECT_TIMEOUT_S = 3.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_SDK_ATTEMPTS = 2
# open_fs's probe: attempts with doubling backoff (0.5 s, 1 s), so an endpoint that stays down
# fails within about PROBE_ATTEMPTS * (connect timeout * SDK attempts) + 1.5 s.
PROBE_ATTEMPTS = 3
PROBE_BACKOFF_S = 0.5
DEFAULT_REGION = "us-east-1"

# The S3 settings remote work needs (Ray Data's read tasks, shard tasks, Train workers: workers on
# other nodes do not inherit the driver's environment); only those set on the driver are passed.
S3_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

T = TypeVar("T")


def s3_env() -> dict[str, str]:
    """The driver's S3 settings (S3_ENV_VARS that are set), for the runtime_env of remote work; with
    ``AWS_PROFILE`` (and no static keys), the keys its profile resolves to here, as other nodes
    have no ``~/.aws``."""
    env = {k: os.environ[k] for k in S3_ENV_VARS if os.environ.get(k)}
    if os.environ.get("AWS_PROFILE") and "AWS_ACCESS_KEY_ID" not in env:
        keys = _credentials()
        names = {"access_key": "AWS_ACCESS_KEY_ID", "secret_key": "AWS_SECRET_ACCESS_KEY",
                 "session_token": "AWS_SESSION_TOKEN"}
        env.update({names[k]: v for k, v in keys.items() if v})
    return env


class StorageError(RuntimeError):
    """A path that cannot be reached or read; the message names the bucket or folder and the cause."""


def original_error(e: BaseException, types: tuple[type[BaseException], ...],
                   but: tuple[type[BaseException], ...] = ()) -> BaseException | None:
    """The first exception of ``types`` (and none of ``but``) in ``e``'s cause chain: Ray wraps a
    task's exception (its wrapper may subclass the original and carries the remote traceback in its
    text), and the user needs the original's one line."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [e]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, types) and not isinstance(exc, but):
            return exc
        stack += [exc.__cause__, exc.__context__, getattr(exc, "cause", None)]
    return None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """``uri`` + ``/`` + parts, for local folders and ``s3://`` prefixes alike."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def _bucket(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0]


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _credentials() -> dict[str, str | None]:
    """Keys given to both clients explicitly, so that they travel with the pickled filesystem
    (pyarrow pickles explicit keys, not what its default chain found): Ray Train's controller
    actor, which writes the checkpoint bookkeeping, is started with Ray's own variables only, and a
    read task on another node has no ``~/.aws``. The environment's static keys first, else what
    botocore's chain resolves here (a named profile, SSO, credential_process, a role); none found:
    {} (each process then asks its own chain, e.g. an instance profile)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        return {"access_key": key, "secret_key": secret, "session_token": os.environ.get("AWS_SESSION_TOKEN")}
    import botocore.exceptions
    import botocore.session

    try:
        found = botocore.session.Session(profile=os.environ.get("AWS_PROFILE") or None).get_credentials()
    except botocore.exceptions.BotoCoreError as e:  # a named profile that does not exist, an expired SSO login
        raise StorageError(f"S3 credentials: {e}") from None
    if found is None:
        return {}
    frozen = found.get_frozen_credentials()
    return {"access_key": frozen.access_key, "secret_key": frozen.secret_key, "session_token": frozen.token}


def _region(bucket: str) -> str:
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region is None and s3_endpoint() is None:  # real AWS without a region: ask where the bucket lives
        region = pafs.resolve_s3_region(bucket)
    return region or DEFAULT_REGION


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=s3_endpoint(), region=_region(bucket), **_credentials(),
        connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_ATTEMPTS))


def s3fs_filesystem(bucket: str) -> Any:
    """An s3fs client with the same endpoint, region, keys and bounds as ``_s3_filesystem``."""
    import s3fs

    keys = _credentials()
    return s3fs.S3FileSystem(
        key=keys.get("access_key"), secret=keys.get("secret_key"), token=keys.get("session_token"),
        endpoint_url=s3_endpoint(), client_kwargs={"region_name": _region(bucket)}, skip_instance_cache=True,
        config_kwargs={"connect_timeout": S3_CONNECT_TIMEOUT_S, "read_timeout": S3_REQUEST_TIMEOUT_S,
                       "retries": {"max_attempts": S3_SDK_ATTEMPTS, "mode": "standard"}})


def small_view(fs: pafs.FileSystem, uri: str) -> pafs.FileSystem:
    """The client for listing and small objects such as manifests (not shards) of ``uri``, opened
    as ``fs`` by ``open_fs``: s3fs behind pyarrow's fsspec handler on S3, ``fs`` itself elsewhere."""
    if not is_s3(uri):
        return fs
    return pafs.PyFileSystem(pafs.FSSpecHandler(s3fs_filesystem(_bucket(uri))))


def open_small_fs(uri: str, *, must_exist: bool = False) -> tuple[pafs.FileSystem, str]:
    """``open_fs``'s probe, then ``small_view`` of the location."""
    fs, path = open_fs(uri, must_exist=must_exist)
    return small_view(fs, uri), path


def where(uri: str) -> str:
    """How an error names a location: the bucket and endpoint for S3, the folder otherwise."""
    if is_s3(uri):
        return f"bucket {_bucket(uri)!r} ({uri}) at {s3_endpoint() or 'AWS'}"
    return uri


def with_retries(what: str, fn: Callable[[], T], attempts: int = PROBE_ATTEMPTS,
                 backoff_s: float = PROBE_BACKOFF_S) -> T:
    """``fn()``, retried on OSError (network, throttling) with doubling backoff; then one StorageError."""
    for attempt in range(attempts):
        try:
            return fn()
        except OutsideRoots:  # a refusal, not a hiccup
            raise
        except (OSError, pa.ArrowException) as e:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {e} (after {attempts} attempts)") from None
            time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")  # the loop returns or raises


def open_fs(uri: str, *, must_exist: bool = False) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``uri`` and the path inside it, after a probe that the location answers.

    ``must_exist``: the path must be a folder or prefix with something under it (a source to read).
    Raises StorageError naming the bucket or folder: unreachable endpoint, refused credentials,
    missing bucket or prefix. Never hangs: every request is bounded (constants above).
    """
    if is_s3(uri):
        bucket = _bucket(uri)
        if not bucket:
            raise StorageError(f"{uri}: no bucket in the URI (expected s3://BUCKET/PREFIX)")
        try:
            fs: pafs.FileSystem = _s3_filesystem(bucket)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"cannot reach {where(uri)}: {e}") from None
        path = uri[len("s3://"):].rstrip("/")
    elif "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: only local folders and s3:// prefixes are supported")
    else:
        fs = pafs.LocalFileSystem()
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    info = with_retries(f"cannot reach {where(uri)}", lambda: fs.get_file_info(path))
    if must_exist:
        if info.type == pafs.FileType.File:
            raise StorageError(f"{where(uri)}: is a file, expected a folder or prefix")
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{where(uri)}: does not exist (or is empty)")
    elif is_s3(uri):  # a prefix to write to: its bucket must exist and answer
        binfo = with_retries(f"cannot reach {where(uri)}", lambda: fs.get_file_info(_bucket(uri)))
        if binfo.type == pafs.FileType.NotFound:
            raise StorageError(f"{where(uri)}: the bucket does not exist")
    return fs, path


def confined(fs: pafs.FileSystem, path: str, *, also: Iterable[str] = ()) -> str:
    """``path``, checked to lie under the job's roots (widened by ``also``, folders the service chose)
    if it is local; raises OutsideRoots naming it. For a file pyarrow opens next."""
    if isinstance(fs, pafs.LocalFileSystem):
        confine.check(path, also=also)
    return path


def read_bytes(fs: pafs.FileSystem, path: str, *, also: Iterable[str] = ()) -> bytes:
    """The file's bytes; a local file is opened under the job's roots (OutsideRoots otherwise)."""
    if isinstance(fs, pafs.LocalFileSystem):
        with confine.open_file(path, "rb", also=also) as f:
            return f.read()
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, *, also: Iterable[str] = ()) -> None:
    """Write ``data`` so that ``path`` is either absent or complete: an S3 PUT (or completed
    multipart upload) appears whole; a local file is written beside, under the job's roots
    (OutsideRoots before anything is created otherwise), and renamed over."""
    if isinstance(fs, pafs.LocalFileSystem):
        confine.check(path, also=also)  # its folders too: no folder is created through a link out
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with confine.open_file(tmp, "wb", also=also) as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The URI a user (and Ray Data) names ``path`` of ``fs`` by."""
    return f"s3://{path}" if is_s3_fs(fs) else path


def is_s3_fs(fs: pafs.FileSystem) -> bool:
    """pyarrow's S3 filesystem, or s3fs behind pyarrow's fsspec handler."""
    return isinstance(fs, pafs.S3FileSystem) or (isinstance(fs, pafs.PyFileSystem) and "s3" in fs.type_name)


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local folder holding what the folder or prefix ``uri`` holds: a local folder itself, or a
    temporary copy of an ``s3://`` prefix (deleted when the block ends; what was read from it stays
    in memory). For readers that take a path, such as ``torch.load`` of a checkpoint."""
    if not is_s3(uri):
        yield Path(uri).expanduser().resolve()
        return
    fs, path = open_fs(uri, must_exist=True)
    with tempfile.TemporaryDirectory(prefix="s3-copy-") as tmp:
        with_retries(f"cannot copy {where(uri)}",
                     lambda: pafs.copy_files(path, tmp, source_filesystem=fs,
                                             destination_filesystem=pafs.LocalFileSystem()))
        yield Path(tmp)
