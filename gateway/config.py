"""Gateway configuration: YAML, `${VAR}` expansion, environment overrides, validation.

The seed format works as written:

    server: {port: 8080}
    logging: {level: INFO}
    providers:
      openai: {api_key: "${OPENAI_API_KEY}", api_url: "https://api.openai.com/v1", is_openai_compatible: true}
    models:
      gpt-4o: openai

Every problem is reported as one `ConfigError` line that names the key.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

PROVIDER_TYPES = ("openai", "gemini", "ollama", "anthropic", "azure", "dummy")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")
DEFAULT_API_URLS = {
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com",
    "ollama": "http://localhost:11434",
    "anthropic": "https://api.anthropic.com",
}
AZURE_STYLES = ("deployment", "v1")
DUMMY = "dummy"

# Environment variables that override YAML, and the key each one overrides.
ENV_OVERRIDES = {
    "SERVER_HOST": ("server", "host"),
    "SERVER_PORT": ("server", "port"),
    "GRPC_PORT": ("server", "grpc_port"),
    "GRPC_TARGET": ("server", "grpc_target"),
    "WORKERS": ("server", "workers"),
    "REQUEST_TIMEOUT": ("server", "request_timeout"),
    "DRAIN_CANCELLED_STREAMS": ("server", "drain_cancelled_streams"),
    "SHUTDOWN_DELAY": ("server", "shutdown_delay"),
    "SHUTDOWN_GRACE": ("server", "shutdown_grace"),
    "WATCH_CONFIG": ("server", "watch_config"),
    "LOG_LEVEL": ("logging", "level"),
    "REDIS_URL": ("state", "redis_url"),
    "USAGE_DATABASE": ("usage", "database"),
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the key."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int = 50051
    # host:port of a remote gRPC service; empty means the facade calls the service in-process.
    grpc_target: str = ""
    workers: int = 1
    # Seconds; the overall deadline of a request when the client sets none.
    request_timeout: float = 600.0
    max_body_bytes: int = 4 * 1024 * 1024
    # On a client disconnect mid-stream, keep reading the upstream (within the deadline) for its final
    # usage, so token metrics are exact; off, the upstream request is closed at once.
    drain_cancelled_streams: bool = False
    # On SIGTERM: seconds to keep serving with /readyz at 503 (load balancers take the gateway out),
    # then seconds the requests in flight get to finish before they are ended cleanly.
    shutdown_delay: float = 0.0
    shutdown_grace: float = 30.0
    # Reload when the config file's directory changes (a ConfigMap's symlink swap included).
    watch_config: bool = True


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    api_url: str = ""
    api_key: str = field(default="", repr=False)
    connect_timeout: float = 10.0
    # Seconds of upstream silence (before the first byte and between stream chunks) before giving up.
    read_timeout: float = 600.0
    max_connections: int = 100
    latency_ms: float = 0.0  # dummy only
    anthropic_version: str = "2023-06-01"  # anthropic only: the anthropic-version header
    anthropic_beta: str = ""  # anthropic only: the anthropic-beta header, comma-separated
    azure_style: str = "deployment"  # azure only: deployment URLs, or the v1 API
    api_version: str = ""  # azure only: the api-version query; empty is the style's default
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The egress proxy, http://[user:password@]host:port; None: from HTTPS_PROXY/HTTP_PROXY/NO_PROXY,
    # "": direct. It may hold a password: kept out of the repr.
    proxy: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Timeouts:
    """Per-deployment limits in seconds, all inside the client's overall deadline; None: no limit of
    its own (connect then falls back to the provider's connect_timeout)."""

    connect: float | None = None
    # Until the response headers (unary) or the first stream chunk.
    first_token: float | None = None
    total: float | None = None


@dataclass(frozen=True)
class Deployment:
    """One place a model is served: a provider, the model name there, a weight, its timeouts."""

    name: str
    provider: str
    upstream_model: str
    weight: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)


LOAD_BALANCING = ("weighted", "least_inflight")


@dataclass(frozen=True)
class ModelRoute:
    name: str
    deployments: tuple[Deployment, ...]
    load_balancing: str = "weighted"
    # Other model names to try, in order, when every deployment of this one failed retryably.
    fallback: tuple[str, ...] = ()
    # USD per 1M tokens as exact decimal text ({input, cached_input, output}), overriding the built-in
    # price of every deployment's upstream model; None: the built-in table's.
    price: Mapping[str, str] | None = None

    @property
    def provider(self) -> str:
        return self.deployments[0].provider

    @property
    def upstream_model(self) -> str:
        return self.deployments[0].upstream_model


@dataclass(frozen=True)
class RoutingConfig:
    # Attempts after the first, across a model's deployments, before its fallbacks.
    retries: int = 2
    # Exponential backoff with full jitter: a random wait up to min(max, initial * 2**attempt).
    backoff_initial: float = 0.25
    backoff_max: float = 8.0
    # A deployment failing `cooldown_failures` times within `cooldown_window` seconds is skipped for
    # `cooldown_seconds`, then gets one trial request.
    cooldown_failures: int = 3
    cooldown_window: float = 60.0
    cooldown_seconds: float = 30.0


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; None: no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


BUDGET_PERIODS = ("day", "week", "month")


@dataclass(frozen=True)
class BudgetConfig:
    """Spend allowed per calendar period in UTC, in integer micro-dollars (USD * 1_000_000)."""

    micro_usd: int
    period: str = "month"  # day | week (from Monday) | month


@dataclass(frozen=True)
class ApiKeyConfig:
    """A gateway API key, held only as the SHA-256 digest of its secret."""

    name: str
    sha256: bytes = field(repr=False)
    models: tuple[str, ...] | None = None  # None: every model
    limits: KeyLimits = field(default_factory=KeyLimits)
    metadata: Mapping[str, str] = field(default_factory=dict)
    budget: BudgetConfig | None = None
    source: str = "config"  # "config" (the config file, read-only) or "admin" (created through the admin API)


@dataclass(frozen=True)
class TeamConfig:
    budget: BudgetConfig | None = None


@dataclass(frozen=True)
class AuthConfig:
    # No keys: auth is off, every caller is served.
    keys: tuple[ApiKeyConfig, ...] = ()
    # Teams by name; a key joins one with metadata.team.
    teams: Mapping[str, TeamConfig] = field(default_factory=dict)
    # The SHA-256 of auth.master_key, which the admin API requires; empty: the admin API is off.
    master_sha256: bytes = field(default=b"", repr=False)


WHEN_STATE_DOWN = ("allow", "deny")


@dataclass(frozen=True)
class BudgetsConfig:
    # While Redis is down: allow budgeted calls (their spend reaches the ledger, and the counters are
    # reseeded from it when Redis is back) or deny them (503).
    when_state_down: str = "allow"
    # Seconds between reads of the ledger's spend for the llm_gateway_budget_* gauges.
    metrics_interval: float = 15.0


@dataclass(frozen=True)
class ModelLimits:
    """Limits of one model, across every key."""

    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class LimitsConfig:
    models: Mapping[str, ModelLimits] = field(default_factory=dict)
    # The completion tokens a request reserves against tpm when it sets neither max_completion_tokens
    # nor max_tokens.
    default_max_tokens: int = 4096


@dataclass(frozen=True)
class StateConfig:
    """Where limit state lives: in the process (no URL), or in Redis, shared by every worker and replica."""

    redis_url: str = field(default="", repr=False)
    # Seconds a Redis call may take before the in-process limiter answers instead.
    timeout: float = 0.05
    # Seconds a max_parallel slot lives unless renewed; a replica that dies frees its slots after this.
    slot_lease: float = 10.0


DEFAULT_USAGE_DATABASE = "sqlite:///./llm-gateway-usage.db"
USAGE_SCHEMES = ("sqlite", "postgresql", "postgres")


@dataclass(frozen=True)
class UsageConfig:
    """The usage ledger: one record per call, written in batches off the request path."""

    # sqlite:///relative/path.db, sqlite:////absolute/path.db, postgresql://user:pass@host:port/db; "" is off.
    database: str = field(default=DEFAULT_USAGE_DATABASE, repr=False)
    batch_size: int = 500
    # Seconds between writes when fewer than batch_size records are waiting.
    flush_interval: float = 1.0
    # Records held in memory while the database is away; beyond it the oldest are dropped, and counted.
    buffer: int = 100_000


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    log_level: str = "INFO"
    providers: Mapping[str, ProviderConfig] = field(default_factory=dict)
    models: Mapping[str, ModelRoute] = field(default_factory=dict)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    state: StateConfig = field(default_factory=StateConfig)
    usage: UsageConfig = field(default_factory=UsageConfig)
    budgets: BudgetsConfig = field(default_factory=BudgetsConfig)
    source: str = "<built-in default>"


def load(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config from `path`, else $CONFIG_PATH, else ./config.yml, else the built-in default."""
    env = os.environ if environ is None else environ
    chosen = path or env.get("CONFIG_PATH")
    if not chosen and Path("config.yml").is_file():
        chosen = "config.yml"
    if not chosen:
        return parse({}, env)
    try:
        text = Path(chosen).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config file {chosen}: {exc.strerror}") from None
    return load_text(text, str(chosen), env)


def load_text(text: str, source: str, environ: Mapping[str, str]) -> Config:
    """The config in `text`, the contents of the file `source` (a reload parses the bytes it hashed)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(f"config file {source}: invalid YAML{where}: {problem}") from None
    return parse(data if data is not None else {}, environ, source=source)


# The top-level sections parse() reads; any other top-level key is refused (a typo such as `modles:`,
# or a section this version does not know, such as `auth:` in an older one, must not pass silently).
# A change that adds a section adds its name here.
SECTIONS = ("server", "logging", "providers", "models", "routing", "auth", "limits", "state", "usage", "budgets")


def parse(data: Any, environ: Mapping[str, str], source: str = "<built-in default>") -> Config:
    if not isinstance(data, dict):
        raise ConfigError("config: the top level must be a mapping")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown top-level key (known: {', '.join(SECTIONS)})")
    data = _expand(data, environ)
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ.get(var):
            sect = data.get(section)
            if not isinstance(sect, dict):
                sect = data[section] = {}
            sect[key] = environ[var]

    server = _server(_section(data, "server"))
    logging_section = _section(data, "logging")
    level = str(logging_section.get("level", "INFO")).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"logging.level: {level!r} is not one of {', '.join(LOG_LEVELS[:-1])}")
    providers = {name: _provider(name, spec, environ) for name, spec in _section(data, "providers").items()}
    providers.setdefault(DUMMY, ProviderConfig(name=DUMMY, type=DUMMY))
    models = {str(name): _route(str(name), spec, providers) for name, spec in _section(data, "models").items()}
    models.setdefault(DUMMY, ModelRoute(name=DUMMY, deployments=(Deployment(DUMMY, DUMMY, DUMMY),)))
    for route in models.values():
        for other in route.fallback:
            if other not in models or other == route.name:
                raise ConfigError(f"models.{route.name}.fallback: {other!r} is not another configured model")
    routing = _routing(_section(data, "routing"))
    return Config(
        server=server,
        log_level=level,
        providers=providers,
        models=models,
        routing=routing,
        auth=_auth(_section(data, "auth"), models),
        limits=_limits(_section(data, "limits"), models),
        state=_state(_section(data, "state")),
        usage=_usage(_section(data, "usage")),
        budgets=_budgets(_section(data, "budgets")),
        source=source,
    )


def _expand(value: Any, environ: Mapping[str, str]) -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string; an unset VAR becomes ''."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, dict):
        return {str(k): _expand(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, environ) for v in value]
    return value


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a mapping")
    return value


def _only_known_keys(spec: dict[str, Any], where: str, fields_of: type) -> None:
    known = {f.name for f in fields(fields_of)}
    for key in spec:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")


def _server(spec: dict[str, Any]) -> ServerConfig:
    defaults = ServerConfig()
    _only_known_keys(spec, "server", ServerConfig)
    target = str(spec.get("grpc_target") or "")
    if target and not re.fullmatch(r"[^\s:]+:\d{1,5}", target.removeprefix("dns:///")):
        raise ConfigError(f"server.grpc_target: {target!r} is not host:port")
    return ServerConfig(
        host=str(spec.get("host", defaults.host)),
        port=_port(spec.get("port", defaults.port), "server.port"),
        grpc_port=_port(spec.get("grpc_port", defaults.grpc_port), "server.grpc_port"),
        grpc_target=target,
        workers=_number(spec.get("workers", defaults.workers), "server.workers", int, minimum=1),
        request_timeout=_number(spec.get("request_timeout", defaults.request_timeout), "server.request_timeout"),
        drain_cancelled_streams=_flag(spec.get("drain_cancelled_streams", False), "server.drain_cancelled_streams"),
        shutdown_delay=_number(spec.get("shutdown_delay", defaults.shutdown_delay), "server.shutdown_delay"),
        shutdown_grace=_number(spec.get("shutdown_grace", defaults.shutdown_grace), "server.shutdown_grace"),
        watch_config=_flag(spec.get("watch_config", defaults.watch_config), "server.watch_config"),
        max_body_bytes=_number(
            spec.get("max_body_bytes", defaults.max_body_bytes), "server.max_body_bytes", int, minimum=1
        ),
    )


def _provider(name: str, spec: Any, environ: Mapping[str, str] = os.environ) -> ProviderConfig:
    where = f"providers.{name}"
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping")
    kind = spec.get("type")
    if kind is None:
        if name in PROVIDER_TYPES:
            kind = name
        elif spec.get("is_openai_compatible"):
            kind = "openai"
        else:
            raise ConfigError(f"{where}: set type (one of {', '.join(PROVIDER_TYPES)}) or is_openai_compatible: true")
    if kind not in PROVIDER_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(PROVIDER_TYPES)}")
    api_url = str(spec.get("api_url") or DEFAULT_API_URLS.get(kind, "")).rstrip("/")
    if kind != DUMMY:
        parts = urlsplit(api_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{where}.api_url: {api_url!r} is not an http(s) URL")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ConfigError(f"{where}.api_url: {api_url!r} has a malformed port") from None
    headers = spec.get("headers") or {}
    if not isinstance(headers, dict):
        raise ConfigError(f"{where}.headers: must be a mapping")
    for key, value in headers.items():
        if any(c in f"{key}{value}" for c in "\r\n\0"):
            raise ConfigError(f"{where}.headers.{key}: a header must not hold a line break")
    beta = spec.get("anthropic_beta") or ""
    if isinstance(beta, list):
        beta = ",".join(str(item) for item in beta)
    style = str(spec.get("azure_style") or "deployment")
    if style not in AZURE_STYLES:
        raise ConfigError(f"{where}.azure_style: {style!r} is not one of {', '.join(AZURE_STYLES)}")
    texts = {
        "anthropic_version": str(spec.get("anthropic_version") or "2023-06-01"),
        "anthropic_beta": str(beta),
        "api_version": str(spec.get("api_version") or ""),
    }
    for key, value in texts.items():
        if any(c in value for c in "\r\n\0") or (key == "api_version" and any(c in value for c in " &#?")):
            raise ConfigError(f"{where}.{key}: {value!r} is not a valid value")
    return ProviderConfig(
        name=name,
        type=kind,
        api_url=api_url,
        api_key=str(spec.get("api_key") or ""),
        connect_timeout=_number(spec.get("connect_timeout", 10.0), f"{where}.connect_timeout"),
        read_timeout=_number(spec.get("read_timeout", 600.0), f"{where}.read_timeout"),
        max_connections=_number(spec.get("max_connections", 100), f"{where}.max_connections", int, minimum=1),
        latency_ms=_number(spec.get("latency_ms", 0), f"{where}.latency_ms", minimum=0),
        headers={str(k): str(v) for k, v in headers.items()},
        azure_style=style,
        proxy=_proxy(spec.get("proxy"), api_url if kind != DUMMY else "", environ, where),
        **texts,
    )


def _proxy(value: Any, api_url: str, environ: Mapping[str, str], where: str) -> str | None:
    """The `proxy:` key (None: the environment decides). A bad key, or a bad proxy variable that
    would apply to this provider, is refused here, naming it (never its credentials)."""
    from . import proxy  # not at the top: gateway.proxy reads ConfigError from this module

    configured = None if value is None else str(value)
    if api_url:
        proxy.resolve(configured, api_url, environ, where)
    return configured


def _route(name: str, spec: Any, providers: Mapping[str, ProviderConfig]) -> ModelRoute:
    """`provider`, or {provider, model, ...}, or {deployments: [...], load_balancing, fallback}."""
    where = f"models.{name}"
    deployments: tuple[Deployment, ...]
    if isinstance(spec, str) or (isinstance(spec, dict) and "deployments" not in spec):
        deployments = (_deployment(f"{where}", name, spec, providers),)
        spec = spec if isinstance(spec, dict) else {}
    elif isinstance(spec, dict):
        items = spec["deployments"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}.deployments: must be a non-empty list")
        deployments = tuple(
            _deployment(f"{where}.deployments[{i}]", name, item, providers) for i, item in enumerate(items)
        )
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.deployments: names must be unique (set `name` on each)")
    else:
        raise ConfigError(f"{where}: must be a provider name, {{provider, model}} or {{deployments: [...]}}")
    strategy = str(spec.get("load_balancing", "weighted"))
    if strategy not in LOAD_BALANCING:
        raise ConfigError(f"{where}.load_balancing: {strategy!r} is not one of {', '.join(LOAD_BALANCING)}")
    fallback = spec.get("fallback") or []
    if isinstance(fallback, str):
        fallback = [fallback]
    if not isinstance(fallback, list):
        raise ConfigError(f"{where}.fallback: must be a list of model names")
    return ModelRoute(
        name=name,
        deployments=deployments,
        load_balancing=strategy,
        fallback=tuple(str(f) for f in fallback),
        price=_price(spec.get("price"), f"{where}.price"),
    )


PRICE_KEYS = ("input", "cached_input", "cache_write", "output")


def _price(spec: Any, where: str) -> dict[str, str] | None:
    """{input, cached_input, output} in USD per 1M tokens, each a whole number of micro-dollars."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping of input, cached_input, output (USD per 1M tokens)")
    for key in spec:
        if key not in PRICE_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(PRICE_KEYS)})")
    for key in ("input", "output"):
        if spec.get(key) is None:
            raise ConfigError(f"{where}.{key}: required, USD per 1M tokens")
    prices = {}
    for key, value in spec.items():
        if value is None:  # cached_input: null, priced as input
            continue
        try:
            # Through str, never float arithmetic: 2.5 stays Decimal("2.5").
            amount = Decimal(str(value)) if not isinstance(value, bool) else Decimal("NaN")
        except InvalidOperation:
            amount = Decimal("NaN")
        if not amount.is_finite() or amount < 0 or (amount * 1_000_000) % 1:
            raise ConfigError(f"{where}.{key}: {value!r} is not a price in USD per 1M tokens (at most 6 decimals)")
        prices[key] = str(amount)
    return prices


def _deployment(where: str, model: str, spec: Any, providers: Mapping[str, ProviderConfig]) -> Deployment:
    if isinstance(spec, str):
        spec = {"provider": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a provider name or {{provider, model, weight, timeouts}}")
    provider = spec.get("provider")
    if not isinstance(provider, str):
        raise ConfigError(f"{where}.provider: required, the name of a provider")
    if provider not in providers:
        raise ConfigError(f"{where}: unknown provider {provider!r} (known: {', '.join(sorted(providers))})")
    upstream = str(spec.get("model") or model)
    timeouts = spec.get("timeouts") or {}
    if not isinstance(timeouts, dict):
        raise ConfigError(f"{where}.timeouts: must be a mapping of connect, first_token, total")
    for key in timeouts:
        if key not in ("connect", "first_token", "total"):
            raise ConfigError(f"{where}.timeouts.{key}: unknown key (known: connect, first_token, total)")

    def seconds(key: str) -> float | None:
        value = timeouts.get(key)
        return None if value is None else float(_number(value, f"{where}.timeouts.{key}", minimum=0.001))

    return Deployment(
        name=str(spec.get("name") or f"{provider}/{upstream}"),
        provider=provider,
        upstream_model=upstream,
        weight=_number(spec.get("weight", 1), f"{where}.weight", minimum=0),
        timeouts=Timeouts(connect=seconds("connect"), first_token=seconds("first_token"), total=seconds("total")),
    )


def _routing(spec: dict[str, Any]) -> RoutingConfig:
    defaults = RoutingConfig()
    _only_known_keys(spec, "routing", RoutingConfig)
    return RoutingConfig(
        retries=_number(spec.get("retries", defaults.retries), "routing.retries", int),
        backoff_initial=_number(spec.get("backoff_initial", defaults.backoff_initial), "routing.backoff_initial"),
        backoff_max=_number(spec.get("backoff_max", defaults.backoff_max), "routing.backoff_max"),
        cooldown_failures=_number(
            spec.get("cooldown_failures", defaults.cooldown_failures), "routing.cooldown_failures", int, minimum=1
        ),
        cooldown_window=_number(spec.get("cooldown_window", defaults.cooldown_window), "routing.cooldown_window"),
        cooldown_seconds=_number(spec.get("cooldown_seconds", defaults.cooldown_seconds), "routing.cooldown_seconds"),
    )


_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")
# auth's own keys; each is parsed by its entry in `_auth`.
AUTH_KEYS = ("keys", "teams", "master_key")


def _auth(spec: dict[str, Any], models: Mapping[str, ModelRoute]) -> AuthConfig:
    for key in spec:
        if key not in AUTH_KEYS:
            raise ConfigError(f"auth.{key}: unknown key (known: {', '.join(AUTH_KEYS)})")
    items = spec.get("keys") or []
    if not isinstance(items, list):
        raise ConfigError("auth.keys: must be a list of {name, key | key_sha256, models, limits, metadata, budget}")
    keys = tuple(_api_key(f"auth.keys[{i}]", item, models) for i, item in enumerate(items))
    for what, values in (("names", [k.name for k in keys]), ("keys", [k.sha256 for k in keys])):
        if len(set(values)) != len(values):
            raise ConfigError(f"auth.keys: {what} must be unique")
    teams = {}
    for team, value in _mapping(spec.get("teams"), "auth.teams").items():
        team_spec = _mapping(value, f"auth.teams.{team}")
        _only_known_keys(team_spec, f"auth.teams.{team}", TeamConfig)
        teams[str(team)] = TeamConfig(budget=budget_config(team_spec.get("budget"), f"auth.teams.{team}.budget"))
    master = spec.get("master_key") or ""
    if not isinstance(master, str) or (master and len(master) < 16):
        raise ConfigError("auth.master_key: must be at least 16 characters (is its environment variable set?)")
    master_sha256 = hashlib.sha256(master.encode()).digest() if master else b""
    if master_sha256 and master_sha256 in {k.sha256 for k in keys}:
        raise ConfigError("auth.master_key: must not be one of auth.keys")
    return AuthConfig(keys=keys, teams=teams, master_sha256=master_sha256)


def budget_config(value: Any, where: str) -> BudgetConfig | None:
    """{usd: 100, period: day | week | month}; None when not set. USD to whole micro-dollars, exactly."""
    if value is None:
        return None
    spec = _mapping(value, where)
    for key in spec:
        if key not in ("usd", "period"):
            raise ConfigError(f"{where}.{key}: unknown key (known: period, usd)")
    usd = spec.get("usd")
    try:
        amount = Decimal(str(usd)) * 1_000_000 if usd is not None and not isinstance(usd, bool) else Decimal("NaN")
    except InvalidOperation:
        amount = Decimal("NaN")
    if not amount.is_finite() or amount <= 0 or amount % 1:
        raise ConfigError(f"{where}.usd: {usd!r} is not an amount in USD above 0 (at most 6 decimals)")
    period = str(spec.get("period", "month"))
    if period not in BUDGET_PERIODS:
        raise ConfigError(f"{where}.period: {period!r} is not one of {', '.join(BUDGET_PERIODS)}")
    return BudgetConfig(micro_usd=int(amount), period=period)


def _api_key(where: str, spec: Any, models: Mapping[str, ModelRoute]) -> ApiKeyConfig:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping of name, key | key_sha256, models, limits, metadata")
    for key in spec:
        if key not in ("name", "key", "key_sha256", "models", "limits", "metadata", "budget"):
            raise ConfigError(
                f"{where}.{key}: unknown key (known: budget, key, key_sha256, limits, metadata, models, name)"
            )
    name = spec.get("name")
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise ConfigError(f"{where}.name: required; letters, digits and . _ @ : - (at most 64)")
    where = f"auth.keys.{name}"
    if ("key" in spec) == ("key_sha256" in spec):
        raise ConfigError(f"{where}: set exactly one of key and key_sha256")
    if "key" in spec:
        secret = spec["key"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise ConfigError(f"{where}.key: must be at least 8 characters (is its environment variable set?)")
        sha256 = hashlib.sha256(secret.encode()).digest()
    else:
        text = str(spec["key_sha256"] or "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise ConfigError(f"{where}.key_sha256: must be 64 hexadecimal digits")
        sha256 = bytes.fromhex(text)
    allowed = spec.get("models")
    if allowed is not None:
        if not isinstance(allowed, list) or not all(isinstance(m, str) for m in allowed):
            raise ConfigError(f"{where}.models: must be a list of model names")
        for model in allowed:
            if model not in models:
                raise ConfigError(f"{where}.models: {model!r} is not a configured model")
    limits = _mapping(spec.get("limits"), f"{where}.limits")
    _only_known_keys(limits, f"{where}.limits", KeyLimits)
    metadata = _mapping(spec.get("metadata"), f"{where}.metadata")
    return ApiKeyConfig(
        name=name,
        sha256=sha256,
        models=tuple(allowed) if allowed is not None else None,
        limits=KeyLimits(**{k: _number(v, f"{where}.limits.{k}", int, minimum=1) for k, v in limits.items()}),
        metadata={str(k): str(v) for k, v in metadata.items()},
        budget=budget_config(spec.get("budget"), f"{where}.budget"),
    )


def parse_api_key(where: str, spec: Any, models: Mapping[str, ModelRoute]) -> ApiKeyConfig:
    """One key as auth.keys[] holds it, checked the same way (the admin API's created keys)."""
    return _api_key(where, spec, models)


def _limits(spec: dict[str, Any], models: Mapping[str, ModelRoute]) -> LimitsConfig:
    default_max_tokens = _number(spec.get("default_max_tokens", 4096), "limits.default_max_tokens", int, minimum=1)
    per_model = {}
    for model, value in spec.items():
        if model == "default_max_tokens":
            continue
        if model not in models:
            raise ConfigError(f"limits.{model}: not a configured model")
        limits = _mapping(value, f"limits.{model}")
        _only_known_keys(limits, f"limits.{model}", ModelLimits)
        per_model[model] = ModelLimits(
            **{k: _number(v, f"limits.{model}.{k}", int, minimum=1) for k, v in limits.items()}
        )
    return LimitsConfig(models=per_model, default_max_tokens=default_max_tokens)


def _state(spec: dict[str, Any]) -> StateConfig:
    _only_known_keys(spec, "state", StateConfig)
    url = str(spec.get("redis_url") or "")
    if url and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("state.redis_url: must be a redis://, rediss:// or unix:// URL")
    return StateConfig(
        redis_url=url,
        timeout=_number(spec.get("timeout", 0.05), "state.timeout", minimum=0.001),
        slot_lease=_number(spec.get("slot_lease", 10.0), "state.slot_lease", minimum=0.1),
    )


def _usage(spec: dict[str, Any]) -> UsageConfig:
    _only_known_keys(spec, "usage", UsageConfig)
    database = str(spec.get("database", DEFAULT_USAGE_DATABASE) or "")
    if database:
        parts = urlsplit(database)
        if parts.scheme not in USAGE_SCHEMES or (parts.scheme == "sqlite" and len(parts.path) < 2):
            raise ConfigError(
                "usage.database: must be sqlite:///path/to/file.db, postgresql://user:password@host:port/db or empty"
            )
    return UsageConfig(
        database=database,
        batch_size=_number(spec.get("batch_size", 500), "usage.batch_size", int, minimum=1),
        flush_interval=_number(spec.get("flush_interval", 1.0), "usage.flush_interval", minimum=0.01),
        buffer=_number(spec.get("buffer", 100_000), "usage.buffer", int, minimum=1),
    )


def _budgets(spec: dict[str, Any]) -> BudgetsConfig:
    _only_known_keys(spec, "budgets", BudgetsConfig)
    when = str(spec.get("when_state_down", "allow"))
    if when not in WHEN_STATE_DOWN:
        raise ConfigError(f"budgets.when_state_down: {when!r} is not one of {', '.join(WHEN_STATE_DOWN)}")
    return BudgetsConfig(
        when_state_down=when,
        metrics_interval=_number(spec.get("metrics_interval", 15.0), "budgets.metrics_interval", minimum=0.1),
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping")
    return value


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{where}: {value!r} is not true or false")


def _port(value: Any, where: str) -> int:
    port: int = _number(value, where, int, minimum=1, maximum=65535)
    return port


def _number(value: Any, where: str, kind: type = float, minimum: float = 0, maximum: float | None = None) -> Any:
    try:
        number = kind(value)
        if isinstance(value, bool) or (kind is int and float(value) != number):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not {'an integer' if kind is int else 'a number'}") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise ConfigError(f"{where}: {value!r} must be {bound}")
    return number
