"""moto's S3 server plus the one check it leaves out: a PUT whose body does not match its Content-MD5 or
``x-amz-checksum-crc32`` header is refused with 400 BadDigest, as AWS S3 and MinIO refuse it.

moto 5.2 stores whatever checksum a client sends without comparing it with the body (moto/s3/responses.py,
``_get_checksum``), so on its own it cannot show that a part damaged in transit is refused. Everything else
is moto, unchanged.

    python tests/checking_s3.py PORT
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import zlib
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

_BAD_DIGEST = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>BadDigest</Code><Message>The %s you '
               b"specified did not match the calculated checksum.</Message></Error>")


class VerifyChecksums:
    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        crc = environ.get("HTTP_X_AMZ_CHECKSUM_CRC32")
        md5 = environ.get("HTTP_CONTENT_MD5")
        if environ.get("REQUEST_METHOD") == "PUT" and (crc or md5):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            if crc and base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode() != crc:
                return self._refuse(start_response, b"CRC32")
            if md5 and base64.b64encode(hashlib.md5(body).digest()).decode() != md5:  # noqa: S324 - S3's own digest
                return self._refuse(start_response, b"Content-MD5")
        return self.app(environ, start_response)

    @staticmethod
    def _refuse(start_response: Callable[..., Any], what: bytes) -> Iterable[bytes]:
        body = _BAD_DIGEST % what
        start_response("400 Bad Request", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]


def main() -> None:
    app = VerifyChecksums(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", int(sys.argv[1]), app, True, request_handler=MotoRequestHandler)
    server.serve_forever()


if __name__ == "__main__":
    main()
