"""One HTTP POST for the webhook and the pings, with the failures sorted into "retry" and "retrying is useless".

urllib rather than a client library: no dependency, and it honours HTTPS_PROXY/NO_PROXY as operators expect.
Redirects are refused instead of followed, because urllib turns a redirected POST into a GET without the body.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from app.logs import mask

USER_AGENT = "backup-sidecar"
_RETRYABLE_4XX = (408, 425, 429)


class DeliveryError(Exception):
    """A delivery attempt failed in a way a later attempt may not (timeouts, refused connections, 5xx)."""


class PermanentDeliveryError(DeliveryError):
    """A failure retrying cannot fix (4xx, redirect, refused certificate): logged once, not retried."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def describe(url: str) -> str:
    """Host and port only: a webhook or ping URL carries its token in the path, so the URL itself is a secret."""
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1] or "?"


def post(url: str, body: bytes, content_type: str, timeout: float, context: ssl.SSLContext | None = None) -> int:
    """POST ``body``; return the status, raise DeliveryError/PermanentDeliveryError with a masked one-liner."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise PermanentDeliveryError("not an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url, data=body, method="POST", headers={"Content-Type": content_type, "User-Agent": USER_AGENT}
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read(64 * 1024)
            return int(response.status)
    except urllib.error.HTTPError as exc:
        code = exc.code
        text = f"HTTP {code} {exc.reason}"
        exc.close()
        if 300 <= code < 400:
            raise PermanentDeliveryError(f"{text}: redirected (hint: configure the final URL)") from None
        if 400 <= code < 500 and code not in _RETRYABLE_4XX:
            raise PermanentDeliveryError(mask(text)) from None
        raise DeliveryError(mask(text)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise PermanentDeliveryError(mask(f"TLS certificate refused: {reason.verify_message}")) from None
        raise DeliveryError(mask(str(reason))) from None
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(mask(f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)) from None
