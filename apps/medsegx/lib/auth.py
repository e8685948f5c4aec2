"""One shared API token for every request, when the server is started with one (``$MEDSEGX_API_TOKEN``).

MONAI Label 0.8.5's own authentication (``MONAI_LABEL_AUTH_ENABLE=true``) needs a Keycloak
realm (``MONAI_LABEL_AUTH_REALM_URI``); this is the small alternative for a server behind TLS
(``README.md``: "TLS and authentication"). The token comes from the environment, not ``--conf``:
MONAI Label logs its command line and ``--conf`` pairs, and ``ps`` shows them to every user.
:class:`TokenAuth` wraps the served ASGI app, outside
every other wrapper, so a request without ``Authorization: Bearer <token>`` is answered 401
before its body is read. It also answers the three routes through which the stock 3D Slicer
plugin logs in (``MONAILabelLib/client.py``: ``auth_enabled``, ``auth_token``,
``auth_valid_token``), so Slicer asks for a user name and password at its first request and
works when the token is entered as the password:

- ``GET /auth/``: ``{"enabled": true, ...}`` (no token needed: it is how a client finds out);
- ``POST /auth/token`` (form ``username``, ``password``): the token back as a bearer
  ``access_token`` when the password is the token, else 401;
- ``GET /auth/token/valid``: 200 with a valid token, else 401.

``OPTIONS`` (CORS preflight, which carries no credentials) passes through.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import sys
from urllib.parse import parse_qs

from monailabel.config import settings

from lib import guards

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "MEDSEGX_API_TOKEN"
AUTH_PATH = f"{settings.MONAI_LABEL_API_STR}/auth/"
#: The largest login form read (user name + password, URL-encoded).
MAX_LOGIN_BYTES = 8192


class TokenAuth:
    """ASGI wrapper: 401 for an HTTP request without ``Authorization: Bearer <token>``.

    Args:
        app: the wrapped ASGI app.
        token: the shared secret (non-empty).
    """

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("TokenAuth needs a non-empty token")
        self.app = app
        self.token = token

    def authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, credential = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method")
        if path.rstrip("/") == AUTH_PATH.rstrip("/") and method == "GET":
            return await _answer(send, 200, {"enabled": True, "client_id": "medsegx", "realm": "api_token"})
        if path.rstrip("/") == f"{AUTH_PATH}token" and method == "POST":
            return await self._login(receive, send)
        if not self.authorized(scope):
            logger.warning("refused (401): %s %s without a valid bearer token", method, path)
            return await _answer(send, 401, {"detail": "this server needs 'Authorization: Bearer <token>' "
                                                       f"(the token it was started with: ${TOKEN_VARIABLE})"},
                                 [(b"www-authenticate", b"Bearer")])
        if path.rstrip("/") == f"{AUTH_PATH}token/valid":
            return await _answer(send, 200, {"valid": True})
        return await self.app(scope, receive, send)

    async def _login(self, receive, send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_LOGIN_BYTES:
                return await _answer(send, 413, {"detail": f"login form above {MAX_LOGIN_BYTES} bytes"})
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        form = parse_qs(body.decode("utf-8", errors="replace"))
        password = (form.get("password") or [""])[0]
        if not hmac.compare_digest(password.encode(), self.token.encode()):
            logger.warning("refused (401): login as %r with a wrong password", (form.get("username") or [""])[0])
            return await _answer(send, 401, {"detail": "wrong password: enter the server's API token as the password"})
        await _answer(send, 200, {"access_token": self.token, "token_type": "Bearer"})


async def _answer(send, status: int, payload: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def install_token_auth(fastapi_app, token: str) -> None:
    """Wrap the served app's middleware stack in :class:`TokenAuth`, outermost (idempotent).

    Called after every other wrapper is installed (``MedSegXApp.__init__``), so an unauthenticated
    upload is refused before ``lib.guards.UploadLimit`` counts its body.
    """
    guards.wrap_served_stack(fastapi_app, TokenAuth, token=token)
    logger.info("every request needs 'Authorization: Bearer <token>' ($%s)", TOKEN_VARIABLE)


def install_in_server() -> bool:
    """:func:`install_token_auth` on ``monailabel.app:app`` when ``$MEDSEGX_API_TOKEN`` is set and this
    process serves it; False otherwise (no token, or MONAI Label's background train / scoring processes)."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    served = sys.modules.get("monailabel.app")
    if not token or served is None:
        return False
    install_token_auth(served.app, token)
    return True
