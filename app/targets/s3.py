"""An S3 / MinIO target through the ``minio`` SDK.

Uploads of unknown length use the SDK's multipart primitives directly rather than ``put_object``: that
lets part sizes grow with the backup (16 MiB at first, doubling every 1,000 parts, so the 10,000-part
limit sits near 16 TiB while a small backup buffers only 16 MiB), keeps exactly one part in flight while
the next fills (memory about 2 x part size), and lets the caller decide when to complete or abort, so no
object appears until every target holds a full copy. The SDK is pinned; the contract test covers this use.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import BinaryIO

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import MinioException, S3Error

from app.settings import S3Settings
from app.targets.base import ObjectInfo, Target, TargetError, Upload

MIB = 1024 * 1024
MIN_PART = 5 * MIB
MAX_PART = 5 * 1024 * MIB
DEFAULT_FIRST_PART = 16 * MIB
PARTS_PER_STEP = 1000


def part_size_for(part_number: int, fixed: int | None) -> int:
    """Size of part ``part_number`` (1-based): fixed when S3_PART_SIZE is set, else growing."""
    if fixed:
        return fixed
    return min(DEFAULT_FIRST_PART * 2 ** ((part_number - 1) // PARTS_PER_STEP), MAX_PART)


def max_object_size(fixed: int | None) -> int:
    return sum(part_size_for(n, fixed) for n in range(1, 10_001))


class _StreamingBody(io.RawIOBase):
    """File-like wrapper of a urllib3 response that returns the connection to the pool on close."""

    def __init__(self, response: urllib3.BaseHTTPResponse, describe: str) -> None:
        self._response = response
        self._describe = describe

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._response.read(len(buffer))
        except Exception as exc:
            raise TargetError(f"S3: reading {self._describe} failed: {exc} (hint: check the S3 endpoint)") from exc
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


class _S3Upload(Upload):
    def __init__(self, target: S3Target, key: str) -> None:
        self.t = target
        self.key = key
        self.object_name = target.object_name(key)
        self.upload_id: str | None = None
        self.parts: list[Part] = []
        #: the part being filled, allocated at its full size once: no joins, no copies, no growth
        self.buf = bytearray()
        self.fill = 0
        self.pending: Future[str] | None = None
        self.pool: ThreadPoolExecutor | None = None
        self.done = False

    def _next_size(self) -> int:
        return part_size_for(len(self.parts) + (1 if self.pending else 0) + 1, self.t.settings.part_size)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self.buf:
                self.buf, self.fill = bytearray(self._next_size()), 0
            n = min(len(view), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = view[:n]
            self.fill += n
            view = view[n:]
            if self.fill == len(self.buf):
                self._flush_part()

    def _wait_pending(self) -> None:
        if self.pending is not None:
            future, self.pending = self.pending, None
            etag = self.t.call(future.result, action=f"upload a part of {self.key}")
            self.parts.append(Part(len(self.parts) + 1, etag))
            if len(self.parts) >= 10_000:
                raise TargetError(
                    f"S3: {self.key} reached the 10,000-part limit (hint: set a larger S3_PART_SIZE)"
                )

    def _take_buffer(self) -> bytearray:
        data = self.buf if self.fill == len(self.buf) else self.buf[: self.fill]
        self.buf, self.fill = bytearray(), 0
        return data

    def _flush_part(self) -> None:
        self._wait_pending()  # one part in flight at most: memory stays near 2 x part size
        data = self._take_buffer()
        if self.upload_id is None:
            self.upload_id = self.t.call(
                self.t.client._create_multipart_upload,
                self.t.settings.bucket,
                self.object_name,
                {"Content-Type": "application/octet-stream"},
                action=f"start the upload of {self.key}",
            )
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3-part")
        assert self.pool is not None
        number = len(self.parts) + 1
        self.pending = self.pool.submit(
            self.t.client._upload_part, self.t.settings.bucket, self.object_name, data, None, self.upload_id, number
        )

    def commit(self) -> None:
        try:
            if self.upload_id is None:
                data = bytes(self._take_buffer())
                self.t.call(
                    self.t.client.put_object,
                    self.t.settings.bucket,
                    self.object_name,
                    io.BytesIO(data),
                    len(data),
                    action=f"upload {self.key}",
                )
            else:
                if self.fill:
                    self._flush_part()
                self._wait_pending()
                self.t.call(
                    self.t.client._complete_multipart_upload,
                    self.t.settings.bucket,
                    self.object_name,
                    self.upload_id,
                    self.parts,
                    action=f"complete the upload of {self.key}",
                )
            self.done = True
        except BaseException:
            self.abort()
            raise
        finally:
            self._shutdown()

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.buf, self.fill = bytearray(), 0
        if self.pending is not None:
            self.pending.cancel()  # a part already on the wire finishes in the background and is discarded
            self.pending = None
        self._shutdown()
        if self.upload_id is not None:
            try:
                self.t.call(
                    self.t.client._abort_multipart_upload,
                    self.t.settings.bucket,
                    self.object_name,
                    self.upload_id,
                    action=f"abort the upload of {self.key}",
                )
            except TargetError:
                # Unreachable endpoint: the incomplete upload stays invisible and `prune` aborts it later.
                pass

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


class S3Target(Target):
    name = "s3"

    def __init__(self, settings: S3Settings, connect_timeout: float = 10, read_timeout: float = 120) -> None:
        self.settings = settings
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout),
            maxsize=8,
            retries=urllib3.Retry(total=3, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            region=settings.region,
            secure=settings.secure,
            http_client=http,
        )

    def describe(self) -> str:
        prefix = f"/{self.settings.prefix}" if self.settings.prefix else ""
        return f"s3://{self.settings.bucket}{prefix}"

    def _endpoint(self) -> str:
        return f"{'https' if self.settings.secure else 'http'}://{self.settings.endpoint}"

    def object_name(self, key: str) -> str:
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    def _key(self, object_name: str) -> str:
        if self.settings.prefix:
            return object_name[len(self.settings.prefix) + 1 :]
        return object_name

    def call(self, fn, *args, action: str = "", **kwargs):  # noqa: ANN001, ANN202 - thin error translator
        """Run an SDK call and turn its failures into one-line TargetErrors with hints."""
        try:
            return fn(*args, **kwargs)
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._translate(exc, action) from exc

    def _translate(self, exc: Exception, action: str) -> TargetError:
        if isinstance(exc, S3Error):
            return TargetError(
                f"S3: cannot {action}: {exc.code}: {exc.message} (hint: {self._hint(exc.code)})"
            )
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
            reason = getattr(exc, "reason", None) or exc
            return TargetError(
                f"S3: cannot {action} at {self._endpoint()}: {reason} "
                "(hint: check S3_ENDPOINT and S3_SECURE, and that the server is up)"
            )
        # the SDK reports some malformed server replies as ValueError
        return TargetError(f"S3: cannot {action}: {exc} (hint: check S3_ENDPOINT and S3_REGION)")

    def _hint(self, code: str) -> str:
        return {
            "NoSuchBucket": f"create the bucket {self.settings.bucket!r} first (e.g. `mc mb`); the sidecar never "
            "creates buckets, so a typo cannot scatter backups",
            "AccessDenied": "check S3_ACCESS_KEY_ID/S3_SECRET_ACCESS_KEY and the bucket policy",
            "InvalidAccessKeyId": "check S3_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "check S3_SECRET_ACCESS_KEY and S3_REGION",
            "NoSuchKey": "the object is gone; see `backup-sidecar list`",
        }.get(code, "check the S3 settings and the server's logs")

    def check(self) -> None:
        exists = self.call(self.client.bucket_exists, self.settings.bucket, action="check the bucket")
        if not exists:
            raise TargetError(
                f"S3: bucket {self.settings.bucket!r} does not exist at {self._endpoint()} "
                f"(hint: {self._hint('NoSuchBucket')})"
            )

    def begin(self, key: str) -> Upload:
        return _S3Upload(self, key)

    def open(self, key: str) -> BinaryIO:
        response = self.call(self.client.get_object, self.settings.bucket, self.object_name(key), action=f"read {key}")
        return io.BufferedReader(_StreamingBody(response, key), buffer_size=1024 * 1024)  # type: ignore[return-value]

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self.client.stat_object(self.settings.bucket, self.object_name(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise self._translate(exc, f"stat {key}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._translate(exc, f"stat {key}") from exc
        return ObjectInfo(key, int(st.size or 0), st.last_modified or datetime.now(UTC))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self.object_name(prefix) if prefix else (f"{self.settings.prefix}/" if self.settings.prefix else "")
        objects = self.call(
            self.client.list_objects, self.settings.bucket, prefix=full, recursive=True, action="list the bucket"
        )
        iterator = iter(objects)
        while True:
            obj = self.call(next, iterator, None, action="list the bucket")
            if obj is None:
                return
            if obj.is_dir or obj.object_name is None:
                continue
            yield ObjectInfo(self._key(obj.object_name), int(obj.size or 0), obj.last_modified or datetime.now(UTC))

    def delete(self, key: str) -> None:
        self.call(self.client.remove_object, self.settings.bucket, self.object_name(key), action=f"delete {key}")

    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        cutoff = datetime.now(UTC) - older_than
        prefix = f"{self.settings.prefix}/" if self.settings.prefix else None
        removed: list[str] = []
        key_marker = upload_marker = None
        while True:
            result = self.call(
                self.client._list_multipart_uploads,
                self.settings.bucket,
                prefix=prefix,
                key_marker=key_marker,
                upload_id_marker=upload_marker,
                action="list incomplete uploads",
            )
            for up in result.uploads:
                initiated = up.initiated_time
                if initiated is not None and initiated < cutoff and up.object_name and up.upload_id:
                    self.call(
                        self.client._abort_multipart_upload,
                        self.settings.bucket,
                        up.object_name,
                        up.upload_id,
                        action=f"abort the stale upload of {up.object_name}",
                    )
                    removed.append(self._key(up.object_name))
            if not result.is_truncated:
                return removed
            key_marker, upload_marker = result.next_key_marker, result.next_upload_id_marker
