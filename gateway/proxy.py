"""Egress proxies: which proxy, if any, a provider's upstream URL goes through, decided once per
provider at start-up (never per request).

The environment means what it means to curl and httpx: `https_proxy`/`HTTPS_PROXY` for https URLs,
`http_proxy`/`HTTP_PROXY` for http URLs, `all_proxy`/`ALL_PROXY` for both, the lower-case form
first; `no_proxy`/`NO_PROXY` lists hosts reached directly (comma-separated: `*` for all, a name
for itself and its subdomains, with or without a leading `.` or `*.`, an IP address or CIDR block,
each optionally with `:port`). A proxy URL without a scheme is taken as http://; its port defaults
to 80 (as in httpx; curl's is 1080). A provider's `proxy:` key overrides the environment, and
`proxy: ""` means direct.

Only http:// proxies are spoken (CONNECT for https upstreams, absolute-form requests for http ones;
see http1.py). Credentials in the URL become `Proxy-Authorization: Basic`; they are kept out of
every repr, error and log line (`secrets()` lists what the log redaction must know).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .config import ConfigError


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    # "Basic ..." when the URL has credentials, else "".
    authorization: str = field(default="", repr=False)
    secrets: tuple[str, ...] = field(default=(), repr=False)

    def __str__(self) -> str:
        """How errors and logs name the proxy: its address, never its credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse(url: str, where: str) -> Proxy:
    """A proxy URL (`http://user:pass@host:port`); errors name `where` but never the credentials."""
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"  # without the credentials
    if parts.scheme != "http":
        raise ConfigError(f"{where}: {shown!r}: only http:// proxies are supported")
    if not parts.hostname:
        raise ConfigError(f"{where}: {shown!r} has no host")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"{where}: {shown!r} has a malformed port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {shown!r}: a proxy URL is scheme, host and port only")
    if parts.username is None and parts.password is None:
        return Proxy(parts.hostname, port)
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    raw = parts.password or ""
    return Proxy(parts.hostname, port, f"Basic {token}", tuple(s for s in {raw, password, token} if s))


def bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY sends `host:port` direct."""
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        name, entry_port = entry, ""
        if entry.startswith("["):  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":")
        elif entry.count(":") == 1:
            name, _, entry_port = entry.partition(":")
        if not name or (entry_port and entry_port != str(port)):
            continue
        try:
            network = ipaddress.ip_network(name, strict=False)
        except ValueError:
            name = name.removeprefix("*").removeprefix(".")
            if address is None and (host == name or host.endswith("." + name)):
                return True
            continue
        if address is not None and address in network:
            return True
    return False


def from_environment(url: str, environ: Mapping[str, str], where: str = "") -> Proxy | None:
    """The proxy the environment names for `url`, or None (none named, or NO_PROXY matches)."""
    parts = urlsplit(url)
    scheme = parts.scheme
    for name in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY", "all_proxy", "ALL_PROXY"):
        value = environ.get(name, "").strip()
        if value:
            break
    else:
        return None
    no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
    assert parts.hostname is not None
    if no_proxy and bypassed(parts.hostname, parts.port or (443 if scheme == "https" else 80), no_proxy):
        return None
    return parse(value, f"{name} (for {where})" if where else name)


def resolve(configured: str | None, url: str, environ: Mapping[str, str], where: str) -> Proxy | None:
    """The proxy for a provider's `url`: its `proxy:` key when set ("" is direct), else the environment's."""
    if configured is None:
        return from_environment(url, environ, where)
    return parse(configured, f"{where}.proxy") if configured else None
