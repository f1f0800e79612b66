"""STATUS_TOKEN: the status page and /api/v1 ask for it when it is set; /health and /metrics never do.

The token is accepted as a bearer token (``Authorization: Bearer TOKEN``, for scripts and dashboards) or as
the password of HTTP basic auth with any user name (what a browser asks for). Comparison is constant-time,
so the time an answer takes says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac

from flask import Request

REALM = "backup-sidecar status"


def authorized(request: Request, token: str | None) -> bool:
    """True when no token is configured, or the request carries it."""
    if token is None:
        return True
    auth = request.authorization
    if auth is None:
        return False
    if auth.type == "bearer":
        offered = auth.token or ""
    elif auth.type == "basic":
        offered = auth.password or ""
    else:
        return False
    return hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode())


def challenge() -> dict[str, str]:
    """The WWW-Authenticate header of a 401: a browser then asks for the token (as the password)."""
    return {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'}
