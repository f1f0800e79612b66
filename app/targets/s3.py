"""An S3 / MinIO target through the ``minio`` SDK, written so that any S3 accepts its uploads.

Uploads of unknown length use the SDK's multipart primitives directly rather than ``put_object``:

* **One part size per upload**, chosen before the first byte from the size estimate with 4x headroom under
  the 10,000-part cap and bounded by S3_PART_MEMORY (two parts live at once: the one filling and the one in
  flight). Every non-trailing part has the same length, which Cloudflare R2 requires; an object that would
  outgrow the cap is refused at once with the setting that fixes it, and one that outgrows its estimate
  fails when part 10,001 would be needed, not at commit.
* **Every part carries a CRC32 the server verifies** (``x-amz-checksum-crc32``, declared at
  CreateMultipartUpload and listed again at completion, as AWS and MinIO require), so corruption in transit
  is refused at upload time. That checksum stands for the payload in the signature (``UNSIGNED-PAYLOAD``):
  the SDK would otherwise hash every byte a second time (SHA-256 over HTTP, MD5 over HTTPS) on top of the
  manifest's SHA-256. CRC32 costs about a fifth of SHA-256 here (4 GB/s against 1.4 GB/s).
* **Nothing appears until commit**; an abort waits for the part in flight to settle (AWS: a part still
  uploading may survive an abort) and is retried once; what cannot be aborted in time is left to prune,
  which only ever aborts uploads of the sidecar's own layout under its prefix.
* **Every request is bounded by the run's budget** (app.deadline): timeouts and retries never outlive
  BACKUP_TIMEOUT or the stop budget, and a part thread stuck on a stalled socket is a daemon the process
  does not wait for.

The stat-visible fingerprint of a copy is its ETag: a streamed multipart object cannot carry its SHA-256 in
metadata (metadata is fixed at CreateMultipartUpload, before the checksum exists, and S3's full-object
checksums exist only for CRC algorithms), but the ETag changes whenever the object is replaced and comes free
with every listing. The copy's manifest records it; the catalog compares the two.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO
from xml.etree import ElementTree as ET  # noqa: S405 - parses the server's replies, not untrusted uploads

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.helpers import md5sum_hash

from app import deadline, layout
from app.cancel import Cancelled
from app.deadline import DeadlineExceeded
from app.durations import format_size
from app.settings import S3Settings
from app.targets.base import ObjectInfo, ObjectLocked, Target, TargetError, Upload

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_PART = 5 * MIB
MAX_PART = 5 * 1024 * MIB
MAX_PARTS = 10_000
#: the 10,000-part cap sits at least this many times above the size estimate
HEADROOM = 4
#: smaller parts cost round trips, not safety: no upload uses less than this (or the memory budget allows)
FLOOR_PART = 16 * MIB
CRC_HEADER = "x-amz-checksum-crc32"
_RETRY_STATUS = frozenset({500, 502, 503, 504})
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def plan_part_size(size_hint: int | None, settings: S3Settings, key: str = "the object") -> int:
    """The one part size of an upload, or TargetError (with the fix) when the object could not fit."""
    budget_part = settings.part_memory // 2
    hint = f"about {format_size(size_hint)}" if size_hint else "its size"
    if settings.part_size:
        part = settings.part_size
        if size_hint and size_hint > part * MAX_PARTS:
            raise TargetError(
                f"S3: {key} ({hint}) would outgrow 10,000 parts of S3_PART_SIZE={format_size(part)} "
                f"(hint: raise S3_PART_SIZE to {format_size(_round_mib(size_hint * HEADROOM / MAX_PARTS))} or "
                "unset it, and S3_PART_MEMORY to twice that)")
        if size_hint and size_hint * HEADROOM > part * MAX_PARTS:
            log.warning("S3: %s (%s) leaves less than %dx headroom under 10,000 parts of %s", key, hint, HEADROOM,
                        format_size(part))
        return part
    if not size_hint:
        return max(MIN_PART, min(budget_part, MAX_PART))  # unknown size: the largest part the budget allows
    needed = _round_mib(size_hint * HEADROOM / MAX_PARTS)
    if needed > min(budget_part, MAX_PART):
        memory = _round_mib(2 * needed)
        raise TargetError(
            f"S3: {key} ({hint}) needs parts of at least {format_size(needed)} to stay {HEADROOM}x below the "
            f"10,000-part limit, but S3_PART_MEMORY={format_size(settings.part_memory)} allows "
            f"{format_size(budget_part)} per part (hint: set S3_PART_MEMORY={memory // MIB}MiB or more)")
    return max(MIN_PART, needed, min(FLOOR_PART, budget_part))


def _round_mib(n: float) -> int:
    return max(MIN_PART, math.ceil(n / MIB) * MIB)


def _crc32(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class _Client(Minio):
    """The SDK, minus the second pass over each part: a request that carries our CRC32 is signed with
    ``UNSIGNED-PAYLOAD`` (the server verifies the CRC32 instead), every other request as the SDK does."""

    def _build_headers(self, host: str, headers: Any = None, body: bytes | None = None,
                       creds: Any = None) -> tuple[Any, datetime]:
        if not headers or CRC_HEADER not in headers or body is None:
            return super()._build_headers(host, headers, body, creds)
        built, date = super()._build_headers(host, headers, None, creds)  # no body: no SHA-256, no MD5
        built["Content-Length"] = str(len(body))
        if creds:
            built["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        return built, date


class _Pool(urllib3.PoolManager):
    """The HTTP pool: per-attempt timeouts and retries cut to what the run's budget has left."""

    def __init__(self, connect_s: float, read_s: float, retries: int) -> None:
        super().__init__(maxsize=8, retries=False)
        self.connect_s, self.read_s, self.retries = connect_s, read_s, retries

    def urlopen(self, method: str, url: str, redirect: bool = True, **kw: Any) -> urllib3.BaseHTTPResponse:
        budget = deadline.current()
        attempt = 0
        while True:
            left = deadline.remaining(math.inf)
            if budget is not None:
                if budget.cancel.cancelled:
                    raise Cancelled(f"interrupted: {budget.cancel.reason}")
                if left <= 0:
                    raise DeadlineExceeded(f"S3: {method} {_path(url)} was cut off at {budget.label}",
                                           hint="check the S3 endpoint, or raise BACKUP_TIMEOUT")
            kw["timeout"] = urllib3.Timeout(connect=min(self.connect_s, left), read=min(self.read_s, left))
            kw["retries"] = False
            try:
                response = super().urlopen(method, url, redirect=redirect, **kw)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if budget is not None and deadline.remaining(math.inf) <= 0.5:  # cut off by the budget itself
                    raise DeadlineExceeded(f"S3: {method} {_path(url)} got no answer before {budget.label}",
                                           hint="check the S3 endpoint (it stopped answering), or raise "
                                                "BACKUP_TIMEOUT") from exc
                if attempt >= self.retries or deadline.remaining(math.inf) <= 1:
                    raise
                _log_retry(attempt, exc, url)
            else:
                if response.status not in _RETRY_STATUS or attempt >= self.retries:
                    return response
                response.drain_conn()
                response.release_conn()
            attempt += 1
            pause = 0.5 * 2 ** (attempt - 1)
            if budget is not None:
                budget.sleep(pause)
            else:
                time.sleep(pause)


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


@dataclass
class _Part:
    number: int
    crc32: str
    etag: str = ""


class _InFlight:
    """One part on the wire, on a daemon thread that sees the run's budget. The thread lets go of the part's
    bytes before it reports done, so the next part never finds three buffers alive (memory stays two parts)."""

    def __init__(self, part: _Part, data: bytearray, send: Callable[[bytearray], str]) -> None:
        self.part = part
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._data: bytearray | None = data

        def run() -> None:
            try:
                assert self._data is not None
                part.etag = send(self._data)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                self.error = exc
            finally:
                self._data = None
                self.done.set()

        deadline.run_in_context(run, f"s3-part-{part.number}")


class _S3Upload(Upload):
    def __init__(self, target: S3Target, key: str, part_size: int) -> None:
        self.t = target
        self.key = key
        self.object_name = target.object_name(key)
        self.part_size = part_size
        self.upload_id: str | None = None
        self.parts: list[_Part] = []
        #: the part being filled: allocated at the part size once it is known to need it, never joined or grown
        #: after that (the first one grows from 1 MiB, so a small object never costs a whole part)
        self.buf = bytearray()
        self.fill = 0
        self.written = 0
        self.inflight: _InFlight | None = None
        self.done = False

    # --- writing ------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.fill == self.part_size:  # full, and more is coming: it is not the last part
                self._send_full()
            if self.fill == len(self.buf):
                self._grow()
            n = min(len(view), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = view[:n]
            self.fill += n
            self.written += n
            view = view[n:]

    def _grow(self) -> None:
        if self.parts or self.inflight or self.upload_id:
            self.buf = bytearray(self.part_size)
        else:
            new = bytearray(min(self.part_size, max(MIB, 2 * len(self.buf))))
            new[: self.fill] = self.buf[: self.fill]
            self.buf = new

    def _send_full(self, last: bool = False) -> None:
        """Hand the filled buffer to a part thread: a full part with more data to come, or the trailing one."""
        number = len(self.parts) + (1 if self.inflight else 0) + 1
        if not last and number >= MAX_PARTS:
            raise TargetError(
                f"S3: {self.key} outgrew 10,000 parts of {format_size(self.part_size)} "
                f"({format_size(self.written)} so far; its size estimate was far too low) "
                f"(hint: set S3_PART_MEMORY to at least {format_size(4 * self.part_size)})")
        self._settle()  # at most one part in flight: memory stays at two parts
        if self.upload_id is None:
            headers = {"Content-Type": "application/octet-stream", "x-amz-checksum-algorithm": "CRC32",
                       **self.t.lock_headers(self.key)}
            self.upload_id = self.t.call(self.t.client._create_multipart_upload, self.t.settings.bucket,
                                         self.object_name, headers, action=f"start the upload of {self.key}")
        data = self.buf if self.fill == len(self.buf) else self.buf[: self.fill]
        self.buf, self.fill = bytearray(), 0
        upload_id = self.upload_id
        part = _Part(number, "")

        def send(body: bytearray) -> str:
            part.crc32 = _crc32(body)  # on the part's thread: overlaps the next part's filling
            return self.t.call(self.t.client._upload_part, self.t.settings.bucket, self.object_name, body,
                               {CRC_HEADER: part.crc32}, upload_id, number,
                               action=f"upload part {number} of {self.key}")

        self.inflight = _InFlight(part, data, send)
        del data

    def _settle(self) -> None:
        """Wait for the part in flight; raise its failure, or the budget's end."""
        flight = self.inflight
        if flight is None:
            return
        budget = deadline.current()
        if budget is not None:
            try:
                budget.wait(flight.done, f"S3: part {flight.part.number} of {self.key}")
            except DeadlineExceeded as exc:
                raise DeadlineExceeded(
                    f"S3: the upload of {self.key} made no progress and was abandoned at {budget.label}",
                    hint="check the S3 endpoint (it stopped reading), or raise BACKUP_TIMEOUT") from exc
        else:
            flight.done.wait()
        self.inflight = None
        if flight.error is not None:
            raise flight.error
        self.parts.append(flight.part)

    # --- publishing ---------------------------------------------------------------------------------------
    def commit(self, sha256: str | None = None) -> str | None:
        try:
            if self.upload_id is None:
                data = bytes(self.buf[: self.fill])
                # Content-MD5 too: a bucket with a default Object Lock retention refuses a PUT without it (or
                # a named checksum algorithm), whatever S3_OBJECT_LOCK says; single PUTs are small objects
                headers = {CRC_HEADER: _crc32(data), "Content-Type": "application/octet-stream",
                           "Content-MD5": md5sum_hash(data), **self.t.lock_headers(self.key)}
                if sha256:
                    headers["x-amz-meta-sha256"] = sha256
                result = self.t.call(self.t.client._put_object, self.t.settings.bucket, self.object_name, data,
                                     headers, action=f"upload {self.key}")
                etag = result.etag
            else:
                if self.fill:
                    self._send_full(last=True)
                self._settle()
                etag = self._complete()
        except BaseException:
            # No abort here: the caller aborts within its own budget (a stop's cleanup budget, not the run's:
            # waiting here for a stalled part would outlast the stop grace).
            self.buf, self.fill = bytearray(), 0
            raise
        self.done = True
        self.buf, self.fill = bytearray(), 0
        return f"etag:{etag.strip(chr(34))}" if etag else None

    def _complete(self) -> str:
        root = ET.Element("CompleteMultipartUpload")
        for part in self.parts:
            el = ET.SubElement(root, "Part")
            ET.SubElement(el, "PartNumber").text = str(part.number)
            ET.SubElement(el, "ETag").text = f'"{part.etag.strip(chr(34))}"'
            ET.SubElement(el, "ChecksumCRC32").text = part.crc32
        body = ET.tostring(root)
        headers = {"Content-Type": "application/xml", "Content-MD5": md5sum_hash(body)}
        response = self.t.call(self.t.client._execute, "POST", self.t.settings.bucket, self.object_name,
                               body=body, headers=headers, query_params={"uploadId": self.upload_id or ""},
                               action=f"complete the upload of {self.key}")
        doc = ET.fromstring(response.data)  # noqa: S314 - the server's own reply
        if doc.tag.endswith("Error"):  # S3 may answer 200 and report the failure in the body
            code = doc.findtext("Code") or doc.findtext(f"{_S3_NS}Code") or "InternalError"
            message = doc.findtext("Message") or doc.findtext(f"{_S3_NS}Message") or ""
            raise TargetError(f"S3: cannot complete the upload of {self.key}: {code}: {message} "
                              f"(hint: {self.t._hint(code)})")
        return doc.findtext(f"{_S3_NS}ETag") or doc.findtext("ETag") or ""

    def abort(self) -> None:
        """Drop the upload: only once the part in flight settled (or the budget for waiting ran out), then
        AbortMultipartUpload, retried once. What is left behind is an incomplete upload prune aborts later."""
        if self.done:
            return
        self.done = True
        self.buf, self.fill = bytearray(), 0
        flight, self.inflight = self.inflight, None
        if self.upload_id is None:
            return
        if flight is not None:
            budget = deadline.current()
            left = budget.remaining() if budget is not None else 30.0
            if not flight.done.wait(max(0.0, min(left, 30.0))):
                log.warning("S3: part %d of %s is still in flight; the incomplete upload is left for prune to "
                            "abort", flight.part.number, self.key)
                return
        for attempt in (1, 2):
            try:
                self.t.call(self.t.client._abort_multipart_upload, self.t.settings.bucket, self.object_name,
                            self.upload_id, action=f"abort the upload of {self.key}")
                return
            except (TargetError, DeadlineExceeded, Cancelled) as exc:
                if attempt == 2 or isinstance(exc, (DeadlineExceeded, Cancelled)):
                    log.warning("S3: %s; the incomplete upload is left for prune to abort", exc)
                    return


class S3Target(Target):
    name = "s3"

    def __init__(self, settings: S3Settings, connect_timeout: float = 10, read_timeout: float = 60,
                 retries: int = 3) -> None:
        self.settings = settings
        self.client = _Client(
            settings.endpoint,
            access_key=settings.access_key or None,
            secret_key=settings.secret_key or None,
            region=settings.region,
            secure=settings.secure,
            http_client=_Pool(connect_timeout, read_timeout, retries),
        )

    def describe(self) -> str:
        prefix = f"/{self.settings.prefix}" if self.settings.prefix else ""
        return f"s3://{self.settings.bucket}{prefix}"

    def _endpoint(self) -> str:
        return f"{'https' if self.settings.secure else 'http'}://{self.settings.endpoint}"

    def object_name(self, key: str) -> str:
        return f"{self.settings.prefix}/{key}" if self.settings.prefix else key

    def _key(self, object_name: str) -> str | None:
        """The layout key of an object name under our prefix; None for names outside it."""
        if not self.settings.prefix:
            return object_name
        head = f"{self.settings.prefix}/"
        return object_name[len(head):] if object_name.startswith(head) else None

    def call(self, fn, *args, action: str = "", **kwargs):  # noqa: ANN001, ANN202 - thin error translator
        """Run an SDK call and turn its failures into one-line TargetErrors with hints."""
        try:
            return fn(*args, **kwargs)
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError, ET.ParseError) as exc:
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
            "BadDigest": "the bytes were damaged on the way to the server (network, proxy); the upload was "
            "refused, nothing was stored",
            "InvalidDigest": "the server rejected the part checksum; check that it supports x-amz-checksum-crc32",
            "InvalidPart": "the server lost a part of the upload; run the backup again",
        }.get(code, "check the S3 settings and the server's logs")

    def check(self) -> None:
        exists = self.call(self.client.bucket_exists, self.settings.bucket, action="check the bucket")
        if not exists:
            raise TargetError(
                f"S3: bucket {self.settings.bucket!r} does not exist at {self._endpoint()} "
                f"(hint: {self._hint('NoSuchBucket')})"
            )
        if self.settings.object_lock:
            self.lock_config()

    # --- Object Lock (S3_OBJECT_LOCK) ---------------------------------------------------------------------
    def lock_config(self) -> str:
        """The bucket's Object Lock configuration in words; TargetError with the way to enable it when off."""
        bucket = self.settings.bucket
        try:
            config = self.client.get_object_lock_config(bucket)
        except S3Error as exc:
            if "ObjectLock" not in exc.code and exc.code not in ("InvalidRequest", "NotImplemented"):
                raise self._translate(exc, "read the bucket's Object Lock configuration") from exc
            raise TargetError(
                f"S3: bucket {bucket!r} has no Object Lock, but S3_OBJECT_LOCK={self.settings.object_lock.lower()} "
                f"({exc.code}) (hint: Object Lock can only be turned on when a bucket is created: create a new one "
                f"with it, e.g. `mc mb --with-lock ALIAS/{bucket}` or `aws s3api create-bucket --bucket {bucket} "
                "--object-lock-enabled-for-bucket`, and point S3_BUCKET at it; or set S3_OBJECT_LOCK=off)") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._translate(exc, "read the bucket's Object Lock configuration") from exc
        if config.mode:
            unit = config.duration_unit or ""
            return f"Object Lock on, bucket default {config.mode} {config.duration} {unit}".rstrip()
        return "Object Lock on, no bucket default (the sidecar sets each object's retention)"

    def lock_headers(self, key: str) -> dict[str, str]:
        """Retention for a backup object (artifact, manifest, WAL) written now, as PUT/CreateMultipartUpload
        headers; empty when off, and for anything else (the preflight's probe must stay deletable)."""
        if not self.settings.object_lock or not (layout.is_own_key(key) or layout.is_wal_key(key)):
            return {}
        if ".partial" in key:  # a partial WAL snapshot is superseded within minutes; its full segment is locked
            return {}
        until = datetime.now(UTC) + timedelta(seconds=self.settings.object_lock_s)
        return {"x-amz-object-lock-mode": self.settings.object_lock,
                "x-amz-object-lock-retain-until-date": until.strftime("%Y-%m-%dT%H:%M:%S.000Z")}

    def lock_state(self, key: str) -> tuple[datetime | None, bool]:
        """The current version's retain-until date and legal hold."""
        return self._lock_of(self.object_name(key), None)

    def _lock_of(self, name: str, version: str | None) -> tuple[datetime | None, bool]:
        """Retain-until and legal hold of one version, from HeadObject's x-amz-object-lock-* headers (every
        S3 implementation returns them there; GetObjectRetention is not implemented everywhere)."""
        try:
            st = self.client.stat_object(self.settings.bucket, name, version_id=version)
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise self._translate(exc, f"read the lock of {name}") from exc
        headers = {k.lower(): v for k, v in (st.metadata or {}).items()}
        until_text = headers.get("x-amz-object-lock-retain-until-date")
        until = datetime.fromisoformat(until_text.replace("Z", "+00:00")) if until_text else None
        return until, headers.get("x-amz-object-lock-legal-hold", "").upper() == "ON"

    def hold(self, key: str, on: bool) -> None:
        """Put or lift a legal hold on the current version of ``key`` (`backup-sidecar hold|release`)."""
        fn = self.client.enable_object_legal_hold if on else self.client.disable_object_legal_hold
        self.call(fn, self.settings.bucket, self.object_name(key), action=f"{'hold' if on else 'release'} {key}")

    def _delete_versions(self, key: str) -> None:
        """Every version of ``key``, oldest first: a versioned (locked) bucket keeps a plain DELETE's object
        behind a delete marker forever, freeing nothing. An older version expires before a newer one, so the
        first refusal stops with the newest state still in place."""
        name = self.object_name(key)
        versions = [o for o in self.call(lambda: list(self.client.list_objects(
            self.settings.bucket, prefix=name, include_version=True)), action=f"list the versions of {key}")
            if o.object_name == name]
        versions.sort(key=lambda o: (o.last_modified or datetime.min.replace(tzinfo=UTC), o.is_latest == "true"))
        for v in versions:
            try:
                self.client.remove_object(self.settings.bucket, name, version_id=v.version_id)
            except S3Error as exc:
                until, held = (None, False) if v.is_delete_marker else self._lock_of(name, v.version_id)
                if held or (until is not None and until > datetime.now(UTC)):
                    raise ObjectLocked(key, until, held) from exc
                raise self._translate(exc, f"delete {key}") from exc
            except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                raise self._translate(exc, f"delete {key}") from exc

    def begin(self, key: str, size_hint: int | None = None) -> Upload:
        return _S3Upload(self, key, plan_part_size(size_hint, self.settings, key))

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
        return ObjectInfo(key, int(st.size or 0), st.last_modified or datetime.now(UTC), _etag(st.etag))

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
            key = None if obj.is_dir or obj.object_name is None else self._key(obj.object_name)
            if key is None:
                continue
            yield ObjectInfo(key, int(obj.size or 0), obj.last_modified or datetime.now(UTC), _etag(obj.etag))

    def delete(self, key: str) -> None:
        if self.settings.object_lock:
            self._delete_versions(key)
            return
        self.call(self.client.remove_object, self.settings.bucket, self.object_name(key), action=f"delete {key}")

    def cleanup_incomplete(self, older_than: timedelta) -> list[str]:
        """Abort incomplete uploads older than ``older_than`` that carry the sidecar's layout under its prefix;
        other applications' uploads in the same bucket (or under the same prefix) are never touched."""
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
                key = self._key(up.object_name) if up.object_name else None
                if key is None or not layout.is_own_key(key) or not up.upload_id:
                    continue
                if up.initiated_time is not None and up.initiated_time < cutoff:
                    self.call(self.client._abort_multipart_upload, self.settings.bucket, up.object_name,
                              up.upload_id, action=f"abort the stale upload of {up.object_name}")
                    removed.append(key)
            if not result.is_truncated:
                return removed
            key_marker, upload_marker = result.next_key_marker, result.next_upload_id_marker


def _log_retry(attempt: int, error: BaseException, url: str) -> None:
    """One line per retry, in urllib3's own shape and logger (the pool retries itself, to stay inside the run's
    budget), so app.logs' summary turns a host's retries into one line."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    logging.getLogger("urllib3.connectionpool").warning(
        "Retrying (%s) after connection broken by %r: %s", f"attempt {attempt + 2}", error, _path(url),
        extra={"__urllib3-retry-warning": {"host": host}})


def _path(url: str) -> str:
    """The object path of a request URL, without host or query (which may carry signatures)."""
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]


def _etag(value: str | None) -> str | None:
    return f"etag:{value.strip(chr(34))}" if value else None
