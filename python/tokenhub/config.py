"""The gateway's static configuration: a TOML file of providers and models.

Business data (tenants, API keys, usage) lives in the database, not here. Prices are exact
decimals per 1M tokens (TOML floats are read as decimals, never as binary floats).

Example::

    [server]
    port = 8080

    [[providers]]
    name = "deepseek"
    base_url = "https://api.deepseek.com/v1"
    api_key_env = "DEEPSEEK_API_KEY"

    [[models]]
    id = "deepseek-chat"

      [[models.deployments]]
      provider = "deepseek"
      upstream_model = "deepseek-chat"
      vocab = "deepseek-v4"
      context_window = 131072
      price = { currency = "CNY", input_per_1m = "2", cached_input_per_1m = "0.5",
                output_per_1m = "8" }
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "AdminSettings",
    "Config",
    "ConfigError",
    "Deployment",
    "Model",
    "Price",
    "Provider",
    "Tiers",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration problem; the message names the file and the offending field."""


class Price(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Prices per 1M tokens, exact, in one ISO 4217 currency."""

    currency: str
    input_per_1m: Decimal
    output_per_1m: Decimal
    cached_input_per_1m: Decimal | None = None  # defaults to the input price
    # Prompt tokens written to a provider's prompt cache (Anthropic's
    # cache_creation_input_tokens); defaults to the input price.
    cache_write_per_1m: Decimal | None = None


PROVIDER_KINDS = ("openai", "anthropic")


class Provider(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    base_url: str  # up to and including the version, e.g. https://api.openai.com/v1
    api_key_env: str = ""  # environment variable holding the upstream API key ("" = none)
    # The upstream's wire format: "openai" (chat completions, completions, embeddings; every
    # OpenAI-compatible server) or "anthropic" (the native Messages API).
    kind: str = "openai"
    # The header that carries the key: "" = the kind's own (openai: "Authorization: Bearer
    # <key>"; anthropic: "x-api-key: <key>"); "Authorization" (any case) sends "Bearer <key>"
    # for either kind (DeepSeek's and Kimi's Anthropic-compatible endpoints take a Bearer
    # token); another name sends the bare key in that header (Azure OpenAI: "api-key").
    auth_header: str = ""
    # Extra headers sent with every request (not secrets: those come from api_key_env), and
    # query parameters appended to every path (Azure OpenAI: {"api-version" = "2024-10-21"}).
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    query: dict[str, str] = msgspec.field(default_factory=dict)
    # kind = "anthropic": the anthropic-version header sent (when `headers` does not set one).
    anthropic_version: str = "2023-06-01"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0  # longest silence between two bytes of an upstream reply
    total_timeout_s: float = 600.0
    max_connections: int = 512
    # TLS: verify an https base_url against only the CAs in this PEM file (a private CA),
    # instead of the system's. A relative path is from the working directory.
    ca_file: str = ""
    # Egress: http://[user:password@]host:port of a forward proxy (CONNECT for https upstreams,
    # absolute-form requests for http ones); "" = HTTPS_PROXY / HTTP_PROXY / NO_PROXY from the
    # environment; "direct" = never a proxy.
    proxy_url: str = ""


class Deployment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    provider: str
    upstream_model: str
    name: str = ""  # defaults to "<provider>/<upstream_model>"
    weight: int = 1
    vocab: str = "cl100k_base"  # meter vocabulary for prompts and for streams without usage
    context_window: int = 128_000
    max_output_tokens: int = 8_192  # assumed output cap when a request sets no max_tokens
    price: Price | None = None
    # Routing (tokenhub.router): lower priority is preferred by the "priority" policy; the
    # capacity is the provider's own limits, which the router keeps each deployment under.
    priority: int = 0
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


class Tiers(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A routing model (such as `auto`): each request goes to the cheap or the strong model by
    its complexity score (tokenhub.router.TierScorer); a tenant's contract can forbid the
    strong tier or cap its share (`tokenhub tenants limit T --strong-share-pct N`)."""

    cheap: str  # model ids, each with deployments of its own
    strong: str
    threshold: float | None = (
        None  # the score from which a request is strong (default: the scorer's)
    )
    keywords: list[str] = msgspec.field(default_factory=list)  # extra complexity markers


POLICIES = ("swrr", "random", "p2c", "latency", "cheapest", "priority")
AFFINITY = ("none", "session", "prefix")


class Model(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str  # the public model id clients send
    deployments: list[Deployment] = msgspec.field(default_factory=list)
    owned_by: str = "tokenhub"
    # How a deployment is chosen (tokenhub.router): the policy picks the first, the rest of the
    # decision's order are the fallbacks, at most max_attempts in all.
    policy: str = "swrr"
    max_attempts: int = 3
    # Keep a conversation on one deployment while it is healthy (providers' prompt caches):
    # "session" by the x-session-id header, "prefix" by it or else a hash of the prompt's
    # opening (system prompt and first user turn), "none" not at all.
    affinity: str = "prefix"
    tiers: Tiers | None = None  # a routing model: no deployments of its own


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8080
    database: str = "tokenhub.db"  # SQLite path, sqlite:/// URL or postgresql:// URL
    journal_dir: str = ""  # default: "<database path>-journal" (PostgreSQL: "./<db name>-journal")
    # Size of a usage-journal segment, reserved on disk when it starts (smaller for a small
    # disk: the journal refuses requests once it cannot start the next one).
    journal_segment_bytes: int = 8 * 1024 * 1024
    max_body_bytes: int = 8 * 1024 * 1024
    # After a client disconnects mid-stream, keep reading the upstream for at most this long so
    # the usage event records what the upstream generated (and will bill).
    drain_timeout_s: float = 60.0
    key_refresh_s: float = 0.5
    # What one client may hold without sending a request (tokenhub.gateway.protocol): a request
    # head (request line and headers) must be complete this many seconds after its first byte;
    # a connection with no request in progress is closed after keepalive_timeout_s; over
    # max_connections open at once, a new connection gets a 503 and is closed at once (also
    # capped by the process's file-descriptor limit, which the server raises to its maximum).
    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 10_000
    # This host's name among the hosts on one database (`tokenhub cluster status`); default
    # the machine's hostname. Its heartbeat is written every heartbeat_s seconds; a host
    # silent for more than 3 heartbeats is shown down.
    host_id: str = ""
    heartbeat_s: float = 5.0


class BillingSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # `tokenhub serve` settles usage events into the ledger every this many seconds, in a
    # settler process it starts and supervises (0: off; run `tokenhub billing settle --follow`
    # yourself instead, e.g. on another machine).
    settle_interval_s: float = 0.0
    settle_batch: int = 1000
    # Admit a request only if the tenant's contracts (packages, points, wallet, credit line)
    # can pay for its worst case; streams are ended cleanly when they can pay for no more
    # (tokenhub.billing.pots). Needs settle_interval_s: the server's settler keeps the
    # gateway's view of the balances equal to the ledger.
    admission: bool = False


class ClusterSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Several hosts on one PostgreSQL (`serve --host-id`, issue 13): what each host leases and
    # shares. Cluster mode is on when server.host_id is set, the database is PostgreSQL and
    # billing.admission is on.
    # Redis for rate-limit shares ("" = none: static shares floor(R / hosts)).
    redis_url: str = ""
    # The planned number of hosts, for static shares (0: the hosts alive in cluster_hosts).
    hosts: int = 0
    # Settler partitions of the tenants (0: every settler settles every tenant).
    partitions: int = 0
    # A budget lease's time to live; a host renews its leases well before.
    lease_ttl_s: float = 30.0
    # How long a request waits for its host to lease more budget before a 429.
    acquire_wait_ms: int = 1000
    # Expired leases of a host that never came back are reconciled after this long.
    write_off_s: float = 600.0


class AdminSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # The admin API (/admin/v1, tokenhub.admin): HOST:PORT of its own listener, served by the
    # single process or worker 1 ("" = off). Loopback by default: it changes money and keys.
    listen: str = "127.0.0.1:8081"
    max_body_bytes: int = 1024 * 1024


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:8081) as (host, port); ValueError if it is not one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{listen!r}: write an IPv6 address in brackets, [::1]:8081")
    return host, int(port)


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    billing: BillingSettings = msgspec.field(default_factory=BillingSettings)
    cluster: ClusterSettings = msgspec.field(default_factory=ClusterSettings)
    providers: list[Provider] = msgspec.field(default_factory=list)
    models: list[Model] = msgspec.field(default_factory=list)
    source: str = ""  # where the config was read from, for messages

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an HTTP token


_HOST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def host_id_problem(host_id: str) -> str | None:
    """Why `host_id` cannot name a host (None: it can): 1 to 64 of [A-Za-z0-9._-]."""
    if _HOST_ID.fullmatch(host_id):
        return None
    return f"{host_id[:80]!r} is not a host id (1 to 64 of A-Z a-z 0-9 . _ -)"


def _fail(source: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {where}: {message}")


def validate(cfg: Config, *, environ: dict[str, str] | None = None) -> Config:
    """Checks what the types cannot: references, uniqueness, ranges, environment variables."""
    env = os.environ if environ is None else environ
    src = cfg.source or "<config>"
    s = cfg.server
    if not 0 <= s.port <= 65535:
        raise _fail(src, "server.port", f"{s.port} is not a TCP port")
    if s.max_body_bytes < 1024:
        raise _fail(src, "server.max_body_bytes", "must be at least 1024")
    if s.journal_segment_bytes < 4096:
        raise _fail(src, "server.journal_segment_bytes", "must be at least 4096")
    for field in ("header_timeout_s", "keepalive_timeout_s"):
        if getattr(s, field) <= 0:
            raise _fail(src, f"server.{field}", "must be positive")
    if s.max_connections < 1:
        raise _fail(src, "server.max_connections", "must be at least 1")
    if s.host_id and (problem := host_id_problem(s.host_id)):
        raise _fail(src, "server.host_id", problem)
    if not 0.05 <= s.heartbeat_s <= 3600:
        raise _fail(src, "server.heartbeat_s", "must be from 0.05 to 3600")
    if cfg.admin.listen:
        try:
            split_listen(cfg.admin.listen)
        except ValueError as e:
            raise _fail(src, "admin.listen", f'{e} (or "" for no admin listener)') from None
    if cfg.admin.max_body_bytes < 1024:
        raise _fail(src, "admin.max_body_bytes", "must be at least 1024")
    if cfg.billing.settle_interval_s < 0:
        raise _fail(src, "billing.settle_interval_s", "must be zero (off) or positive")
    if cfg.billing.admission and cfg.billing.settle_interval_s <= 0:
        raise _fail(
            src,
            "billing.admission",
            "needs billing.settle_interval_s > 0 (the server's settler keeps admission's "
            "balances equal to the ledger)",
        )
    if not 1 <= cfg.billing.settle_batch <= 100_000:
        raise _fail(src, "billing.settle_batch", "must be from 1 to 100000")
    c = cfg.cluster
    if c.redis_url and not c.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise _fail(src, "cluster.redis_url", "must be a redis://, rediss:// or unix:// URL")
    if not 0 <= c.hosts <= 1024:
        raise _fail(src, "cluster.hosts", "must be from 0 (the live hosts) to 1024")
    if not 0 <= c.partitions <= 1024:
        raise _fail(src, "cluster.partitions", "must be from 0 (none) to 1024")
    if not 1 <= c.lease_ttl_s <= 3600:
        raise _fail(src, "cluster.lease_ttl_s", "must be from 1 to 3600")
    if not 0 <= c.acquire_wait_ms <= 60_000:
        raise _fail(src, "cluster.acquire_wait_ms", "must be from 0 to 60000")
    if not c.lease_ttl_s < c.write_off_s <= 30 * 86400:
        raise _fail(src, "cluster.write_off_s", "must be more than lease_ttl_s, at most 30 days")
    names: set[str] = set()
    for i, p in enumerate(cfg.providers):
        where = f"providers[{i}]"
        if not _NAME.match(p.name):
            raise _fail(src, f"{where}.name", f"{p.name!r} is not a valid name")
        if p.name in names:
            raise _fail(src, f"{where}.name", f"provider {p.name!r} is defined twice")
        names.add(p.name)
        if not p.base_url.startswith(("http://", "https://")):
            raise _fail(src, f"{where}.base_url", f"{p.base_url!r} is not an http(s) URL")
        if p.api_key_env and p.api_key_env not in env:
            raise _fail(
                src, f"{where}.api_key_env", f"environment variable {p.api_key_env} is not set"
            )
        for field in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if getattr(p, field) <= 0:
                raise _fail(src, f"{where}.{field}", "must be positive")
        if p.kind not in PROVIDER_KINDS:
            raise _fail(src, f"{where}.kind", f"{p.kind!r}: one of {', '.join(PROVIDER_KINDS)}")
        for name, value in [*p.headers.items(), *p.query.items(), ("", p.auth_header)]:
            if any(c in name + value for c in "\r\n\x00"):
                raise _fail(src, f"{where}.headers", "a header or query value has a line break")
        if p.auth_header and not _HEADER.match(p.auth_header):
            raise _fail(src, f"{where}.auth_header", f"{p.auth_header!r} is not a header name")
        for name in p.headers:
            if not _HEADER.match(name):
                raise _fail(src, f"{where}.headers", f"{name!r} is not a header name")
        _check_egress(src, where, p, env)
    from tokenhub import vocabs  # late: keeps `import tokenhub.config` light

    ids: set[str] = set()
    for i, m in enumerate(cfg.models):
        where = f"models[{i}]"
        if not _NAME.match(m.id):
            raise _fail(src, f"{where}.id", f"{m.id!r} is not a valid model id")
        if m.id in ids:
            raise _fail(src, f"{where}.id", f"model {m.id!r} is defined twice")
        ids.add(m.id)
        if m.policy not in POLICIES:
            raise _fail(src, f"{where}.policy", f"{m.policy!r}: one of {', '.join(POLICIES)}")
        if not 1 <= m.max_attempts <= 8:
            raise _fail(src, f"{where}.max_attempts", "must be from 1 to 8")
        if m.affinity not in AFFINITY:
            raise _fail(src, f"{where}.affinity", f"{m.affinity!r}: one of {', '.join(AFFINITY)}")
        if m.tiers is not None:
            if m.deployments:
                raise _fail(src, f"{where}.deployments", "a tiered model routes to its tiers' "
                            "models and has no deployments of its own")  # fmt: skip
            t = m.tiers.threshold
            if t is not None and not 0.0 <= t <= 1.0:
                raise _fail(src, f"{where}.tiers.threshold", "must be from 0 to 1")
            continue
        if not m.deployments:
            raise _fail(src, f"{where}.deployments", "a model needs at least one deployment")
        dep_names: set[str] = set()
        for j, d in enumerate(m.deployments):
            dw = f"{where}.deployments[{j}]"
            if d.provider not in names:
                raise _fail(src, f"{dw}.provider", f"no provider named {d.provider!r}")
            if not d.name:
                d.name = f"{d.provider}/{d.upstream_model}"
            if d.name in dep_names:
                raise _fail(src, f"{dw}.name", f"deployment {d.name!r} appears twice")
            dep_names.add(d.name)
            if d.weight < 0:
                raise _fail(src, f"{dw}.weight", "must be zero or more")
            if d.vocab not in vocabs.VOCABS:
                known = ", ".join(sorted(vocabs.VOCABS))
                raise _fail(src, f"{dw}.vocab", f"unknown vocabulary {d.vocab!r}; known: {known}")
            if d.context_window <= 0 or d.max_output_tokens <= 0:
                raise _fail(src, dw, "context_window and max_output_tokens must be positive")
            if d.price is not None:
                pw = f"{dw}.price"
                if not _CURRENCY.match(d.price.currency):
                    raise _fail(src, f"{pw}.currency", f"{d.price.currency!r} is not ISO 4217")
                for field in (
                    "input_per_1m",
                    "output_per_1m",
                    "cached_input_per_1m",
                    "cache_write_per_1m",
                ):
                    v = getattr(d.price, field)
                    if v is not None and (not v.is_finite() or v < 0):
                        raise _fail(src, f"{pw}.{field}", "must be a non-negative decimal")
            for field in ("rpm", "tpm", "max_concurrency"):
                v = getattr(d, field)
                if v is not None and v <= 0:
                    raise _fail(src, f"{dw}.{field}", "must be positive (leave it out: no limit)")
            if d.priority < 0:
                raise _fail(src, f"{dw}.priority", "must be zero or more")
        if sum(d.weight for d in m.deployments) == 0:
            raise _fail(src, f"{where}.deployments", "all weights are zero")
        if m.policy == "cheapest" and len({d.price.currency for d in m.deployments if d.price}) > 1:
            raise _fail(src, f"{where}.policy", "cheapest compares prices: give the model's "
                        "deployments prices in one currency")  # fmt: skip
    by_id = {m.id: m for m in cfg.models}
    for i, m in enumerate(cfg.models):
        if m.tiers is None:
            continue
        for tier in ("cheap", "strong"):
            target = by_id.get(getattr(m.tiers, tier))
            if target is None or target.tiers is not None:
                name = getattr(m.tiers, tier)
                raise _fail(
                    src, f"models[{i}].tiers.{tier}", f"{name!r} is not a model with deployments"
                )
    return cfg


def _check_egress(src: str, where: str, p: Provider, env: Mapping[str, str]) -> None:
    """ca_file loads, and the proxy (configured or from the environment) is one we can use."""
    from tokenhub.gateway.providers import (
        http as upstream_http,  # late: keeps `import tokenhub.config` light
    )

    if p.ca_file:
        if not p.base_url.startswith("https://"):
            raise _fail(src, f"{where}.ca_file", "is for an https base_url")
        try:
            upstream_http.tls_context(p.ca_file)
        except ValueError as e:
            raise _fail(src, f"{where}.ca_file", str(e)) from None
    try:
        upstream_http.find_proxy(p.base_url, p.proxy_url, env)
    except ValueError as e:
        raise _fail(src, where, str(e)) from None


def from_mapping(data: dict[str, Any], source: str = "<config>") -> Config:
    """A validated Config from already-parsed TOML (floats should be Decimals)."""
    try:
        cfg = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        # msgspec says e.g. "Expected `int`, got `str` - at `$.models[0].deployments[0].weight`"
        msg = str(e)
        where = ""
        m = re.search(r" - at `\$\.?(.*)`$", msg)
        if m:
            where, msg = m.group(1), msg[: m.start()]
        raise _fail(source, where or "(top level)", msg) from None
    cfg.source = source
    return validate(cfg)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Reads and validates a TOML config file; raises ConfigError naming file and field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    try:
        data = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    return from_mapping(data, str(p))
