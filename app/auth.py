"""Who may use the UI: the accounts ``qmoe ui`` accepts, and a gate in front of every route.

The UI launches training processes, reads every run and loads models, so once it listens beyond this
machine (``--host 0.0.0.0``) it needs a login. Accounts come from ``--auth-file`` (``user:password`` lines),
``$QMOE_UI_AUTH`` (``user:password``) or ``--auth-token auto`` (a random password printed once at start,
kept only in this process's memory: nothing about it is written to disk). On loopback no login is needed
unless one of them is given.

Gradio's own login (``launch(auth=...)``) checks most routes but not all of them: in gradio 6
``/gradio_api/cancel``, ``/gradio_api/stream/*``, ``/gradio_api/heartbeat/*``, ``/gradio_api/reset`` and
``/gradio_api/app_id`` answer without a login, and the login page itself embeds the API description (whose
dropdown choices list every run name). :class:`LoginRequired` closes that the other way round: it refuses
every request without a valid Gradio session cookie except the few the login page needs, so a route a
later Gradio adds is closed too, and it serves the login page with an empty API description. It reads the
session the way Gradio's ``get_current_user`` does (``App.tokens`` and ``App.cookie_id``, attributes of the
app Gradio serves); tests/test_ui_security.py fails if that changes.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from qmoe.errors import UsageError

AUTH_ENV = "QMOE_UI_AUTH"
TOKEN_USER = "qmoe"  # the user name of --auth-token auto

# what the login page loads before anyone has logged in: the page itself (Gradio serves its login form on
# "/" to a visitor without a session), the login/logout endpoints, and static front-end files (no data)
PUBLIC_PATHS = frozenset(
    {
        "/",
        "/login",
        "/login/",
        "/logout",
        "/favicon.ico",
        "/robots.txt",
        "/manifest.json",
        "/theme.css",
        "/gradio_api/theme.css",
        "/gradio_api/login_check",
        "/gradio_api/login_check/",
        "/gradio_api/startup-events",  # launch() calls it itself, without a session; it only runs startup once
    }
)
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon", "/gradio_api/svelte/")


def _hash(password: str) -> bytes:
    return hashlib.sha256(password.encode("utf-8")).digest()


@dataclass
class Accounts:
    """User names and password hashes (the plain passwords are not kept); callable as Gradio's ``auth``."""

    hashes: dict[str, bytes] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # user -> where the account came from

    def add(self, user: str, password: str, origin: str) -> None:
        self.hashes[user] = _hash(password)
        self.origins[user] = origin

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def __call__(self, user: str, password: str) -> bool:
        expected = self.hashes.get(user)
        # compare a hash even for an unknown user, so the time taken does not tell which users exist
        return hmac.compare_digest(_hash(password), expected or _hash(secrets.token_hex(8))) and expected is not None


def parse_credential(text: str, where: str) -> tuple[str, str]:
    """``user:password`` (the password may contain ':'); UsageError naming ``where`` otherwise."""
    user, sep, password = text.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise UsageError(f"{where}: expected user:password with a non-empty user and password")
    return user.strip(), password


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """Accounts of an auth file: one ``user:password`` a line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--auth-file {path}: cannot read it ({exc.strerror or exc})") from None
    accounts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            accounts.append(parse_credential(line, f"--auth-file {path} line {number}"))
    if not accounts:
        raise UsageError(f"--auth-file {path}: no user:password line in it")
    return accounts


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only accepts connections from this machine."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def resolve_accounts(
    host: str, auth_file: Path | None = None, auth_token: str | None = None, env: dict | None = None
) -> tuple[Accounts, str | None]:
    """The accounts ``qmoe ui`` accepts and, for ``--auth-token auto``, the one-time login line to print.
    Refuses (UsageError) to serve beyond loopback without any account."""
    env = os.environ if env is None else env
    accounts = Accounts()
    if auth_file is not None:
        for user, password in read_auth_file(auth_file):
            accounts.add(user, password, f"--auth-file {auth_file}")
    if env.get(AUTH_ENV):
        user, password = parse_credential(env[AUTH_ENV], f"${AUTH_ENV}")
        accounts.add(user, password, f"${AUTH_ENV}")
    login = None
    if auth_token is not None:
        if auth_token != "auto":
            # a password on the command line is visible to every user of the machine (ps); use a file for yours
            raise UsageError(f"--auth-token {auth_token!r}: the only valid value is 'auto' (use --auth-file for yours)")
        token = secrets.token_urlsafe(18)
        accounts.add(TOKEN_USER, token, "--auth-token auto")
        login = f"qmoe ui: log in as user {TOKEN_USER!r} with password {token} (valid until this UI stops)"
    if not accounts and not is_loopback(host):
        raise UsageError(
            f"--host {host} serves the UI beyond this machine, and it launches training and reads every run: "
            f"give a login with --auth-file FILE (user:password lines), ${AUTH_ENV}=user:password, "
            "or --auth-token auto"
        )
    return accounts, login


def _logged_in(scope) -> bool:
    """A valid Gradio session cookie (set by Gradio's /login) on this request."""
    gradio_app = scope.get("app")
    cookie_id = getattr(gradio_app, "cookie_id", None)
    tokens = getattr(gradio_app, "tokens", None)
    if cookie_id is None or tokens is None:
        return False  # not the Gradio app we were installed on: refuse rather than guess
    cookies = HTTPConnection(scope).cookies
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        token = cookies.get(name)
        if token and token in tokens:
            return True
    return False


class LoginRequired:
    """ASGI middleware for the app Gradio serves: every HTTP and websocket request needs a logged-in
    session, except :data:`PUBLIC_PATHS` / :data:`PUBLIC_PREFIXES` (the login page and its static files)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if _logged_in(scope):
            return await self.app(scope, receive, send)
        if path == "/" and scope["type"] == "http":
            return await self._login_page(scope, receive, send)
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        response = JSONResponse({"detail": "Not authenticated: log in on the UI's start page"}, status_code=401)
        await response(scope, receive, send)

    async def _login_page(self, scope, receive, send):
        """Gradio's page for a visitor without a session is its login form, but it still embeds the API
        description, whose parameter choices list e.g. every run name: serve it with an empty one."""
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await _send_stripped(start, b"".join(chunks), send)

        await self.app(scope, receive, capture)


_API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*.*?;\s*</script>", re.DOTALL)
_NO_API_INFO = b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


async def _send_stripped(start: dict, body: bytes, send) -> None:
    if start.get("status") == 200 and body:
        body, found = _API_INFO.subn(_NO_API_INFO, body, count=1)
        if not found:  # a Gradio whose page differs: refuse rather than leak what the page embeds
            start, body = (
                {"type": "http.response.start", "status": 503, "headers": []},
                (b"qmoe ui: this Gradio version's login page is not recognised; refusing to serve it"),
            )
    if not body:  # HEAD: nothing embedded, headers as Gradio made them
        await send(start)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
