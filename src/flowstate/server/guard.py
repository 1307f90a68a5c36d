"""Who may talk to the server from a browser: the ``Host`` and ``Origin`` checks that keep web
pages of other sites from writing to (or, through DNS rebinding, reading) a server without a
token, the bearer token's scheme, and the security headers of the web UI.

A browser sends ``Origin`` with every cross-site ``POST``, also in ``no-cors`` mode, where a
page cannot read the answer but the request still lands; a request without ``Content-Type`` is
read as protobuf (what the Go client sends), so a page could commit without any preflight.
Refusing foreign origins before the body is read closes that. DNS rebinding points a name the
page's site controls at 127.0.0.1 after the page has loaded: the browser then thinks the server
is the page's own origin, but it still sends that name as ``Host``, which this server does not
answer to.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Host names every server answers to: the loopback names (IP literals are always accepted).
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Status of a request whose ``Host`` is not one of this server's names (RFC 9110 §15.5.20).
MISDIRECTED = 421
#: Status of a request from a page whose origin is not allowed.
FORBIDDEN = 403

#: The web UI's Content-Security-Policy: its own scripts, styles and API only (the favicon is
#: a data: URL), no plugins, never framed.
CSP = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
_UI_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
]


def bearer_matches(given: bytes | None, token: bytes) -> bool:
    """Whether an ``Authorization`` value carries ``token`` as a bearer token: the scheme is
    case-insensitive (RFC 7235 §2.1), the token is compared in constant time."""
    if given is None:
        return False
    scheme, _, rest = given.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    return hmac.compare_digest(rest.lstrip(b" "), token)


def host_name(host: str) -> str:
    """The name in a ``Host`` value (or an allowed-host entry), lower case, without port,
    brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """The ``Host`` and ``Origin`` policy of one server.

    ``allowed_hosts``: names besides the loopback names that ``Host`` may carry; an entry
    ``*.example.com`` allows the subdomains of ``example.com``, ``*`` any name. IP literals are
    always allowed (a page can only make the browser send one by being served from that very
    address). ``cors_origins``: the origins (``scheme://host[:port]``, ``*`` for any) whose pages
    may call the server; a page of the server's own origin (``Origin`` naming the ``Host`` it
    called) always may.
    """

    def __init__(self, allowed_hosts: Iterable[str] = (), cors_origins: Sequence[str] = ()):
        names = {host_name(h) for h in allowed_hosts if h.strip()}
        self.any_host = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*.") and len(n) > 2)
        self.names = frozenset(n for n in names if not n.startswith("*")) | set(LOOPBACK_NAMES)
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(o.encode("latin-1") for o in cors_origins)

    def host_allowed(self, host: bytes | None) -> bool:
        """Whether a request with this ``Host`` (None or empty: no header) is for us."""
        if not host or self.any_host:
            return True
        name = host_name(host.decode("latin-1"))
        if name in self.names or _is_ip(name):
            return True
        return any(name.endswith(s) for s in self.suffixes)

    def origin_allowed(self, origin: bytes, host: bytes | None) -> bool:
        """Whether a page of ``origin`` may call us (``host``: the request's ``Host``)."""
        if self.any_origin or origin in self.origins:
            return True
        return host is not None and _same_origin(origin, host)

    def refusal(self, host: bytes | None, origin: bytes | None) -> tuple[int, str] | None:
        """(status, message) for a request these headers make us refuse; None to serve it."""
        if not self.host_allowed(host):
            name = host.decode("latin-1") if host else ""
            return MISDIRECTED, (
                f"host {name!r} is not a name of this server "
                "(allow it with --allowed-host or FLOWSTATE_ALLOWED_HOSTS)"
            )
        if origin is not None and not self.origin_allowed(origin, host):
            return FORBIDDEN, (
                f"origin {origin.decode('latin-1')!r} is not allowed "
                "(allow it with --cors-origin or FLOWSTATE_CORS_ORIGINS)"
            )
        return None


_DEFAULT_PORT = {b"http": b":80", b"https": b":443"}


def _same_origin(origin: bytes, host: bytes) -> bool:
    """``Origin`` names the host and port the request was sent to (scheme http or https: TLS
    may end at a proxy in front of us)."""
    scheme, sep, netloc = origin.partition(b"://")
    default = _DEFAULT_PORT.get(scheme.lower())
    if not sep or default is None:
        return False
    netloc, host = netloc.lower(), host.strip().lower()
    return netloc.removesuffix(default) == host.removesuffix(default)


class SecurityHeaders:
    """Adds the web UI's security headers (CSP, ``nosniff``, no framing) to the answers of
    ``/`` and of everything under ``/ui/``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/" or path.startswith("/ui/")):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [(n, v) for n, v in _UI_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
