"""
The configuration as frozen attrs models.

Each field is one TOML key (Exchange's parameter name in snake_case). Its
metadata carries the parser and the one-line documentation that
C{exedge check-config --defaults} prints, so a key is declared, documented
and validated in one place, as Postfix's postconf does.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import attrs

from . import values as v
from .locate import find_line
from .problems import Problem, key_text
from .schedule import ALWAYS, Schedule, parse_schedule, parse_time_zone
from .values import boolean, choice, host_port, integer, ldap_url, list_of, mailbox, name, text, timespan

_REQUIRED = object()


def setting(parse: Callable[[Any], Any], default: Any = _REQUIRED, doc: str = "", *, per_usage: bool = False):
    """
    Declare one configuration key. C{default} may be a callable of the
    usage type when C{per_usage} (Exchange's usage presets).
    """
    metadata = {"parse": parse, "doc": doc, "required": default is _REQUIRED, "per_usage": per_usage}
    if default is _REQUIRED:
        return attrs.field(metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


USAGES = ("Client", "Custom", "Internal", "Internet", "Partner")
AUTH_MECHANISMS = ("None", "Tls", "BasicAuth", "BasicAuthRequireTLS", "ExternalAuthoritative")
PERMISSION_GROUPS = (
    "None", "AnonymousUsers", "ExchangeUsers", "ExchangeServers",
    "ExchangeLegacyServers", "Partners", "Custom",
)
DOMAIN_TYPES = ("Authoritative", "InternalRelay", "ExternalRelay")

# Exchange's usage-type presets (New-ReceiveConnector -Usage). Client and
# Internet serve every peer unless remote_ip_ranges says otherwise; Custom,
# Internal and Partner must name theirs (no default: the key is required).
ANY_REMOTE_IP = (v.parse_ip_range("0.0.0.0-255.255.255.255"),)
RECEIVE_USAGE_DEFAULTS = {
    "Client": {"permission_groups": ("ExchangeUsers",), "auth_mechanisms": ("Tls", "BasicAuth", "BasicAuthRequireTLS"),
               "remote_ip_ranges": ANY_REMOTE_IP},
    "Internal": {"permission_groups": ("ExchangeServers", "ExchangeLegacyServers"), "auth_mechanisms": ("Tls",)},
    "Internet": {"permission_groups": ("AnonymousUsers",), "auth_mechanisms": ("Tls",),
                 "remote_ip_ranges": ANY_REMOTE_IP},
    "Partner": {"permission_groups": ("Partners",), "auth_mechanisms": ("Tls",)},
    "Custom": {"permission_groups": (), "auth_mechanisms": ("Tls",)},
}


@attrs.frozen(kw_only=True)
class ServerConfig:
    # a factory: asking the resolver for this host's name when the module is
    # imported would be a DNS lookup in every process that imports exedge
    # (the commit worker, the CLI), and a hang where DNS is unreachable
    fqdn: str = setting(v.parse_fqdn, attrs.Factory(socket.getfqdn), "name of this server: banner, EHLO and Received headers (default: this host's FQDN)")
    spool_directory: str = setting(text, "var/spool", "where accepted messages wait, fsync'ed, until delivered (relative to the working directory)")
    dns_servers: tuple = setting(list_of(host_port(53)), (), "DNS servers for routing as \"ip\" or \"ip:port\"; empty = the system resolver")
    spool_threads: int = setting(integer(1, 64), 4, "threads that stream large messages to disk while they arrive and read them back (commits are done by the commit worker process)")
    receive_workers: int = setting(integer(0, 64), 0, "processes that run the SMTP sessions, the pipeline's SMTP hooks and cleanup, each with its own commit worker; the main process accepts, counts connection limits and hands each connection to one (exedge/receive/workers.py); 0 = everything in one process")
    delivery_threads: int = setting(integer(1, 64), 1, "threads for delivery-side disk work (drop directories, outcomes, removal)")
    plugin_directory: str = setting(text, "plugins", "where drop-in pipeline stages are found (a package directory with __init__.py)")
    certificate_file: str | None = setting(text, None, "PEM certificate (chain) for receive connectors that set none; without one, Tls connectors use a self-signed certificate made at start-up")
    private_key_file: str | None = setting(text, None, "PEM private key of certificate_file (default: the same file)")
    quarantine_mailbox: str | None = setting(mailbox, None, "where pipeline stages send messages they quarantine; without one, a quarantined message is refused (550 5.7.1)")


def group_map(value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError("expected a table of directory group = permission group")
    out = {}
    for group, permission in value.items():
        if permission not in ("ExchangeServers", "ExchangeLegacyServers", "Partners"):
            raise ValueError(f"{group!r}: maps to ExchangeServers, ExchangeLegacyServers or Partners, "
                             f"not {permission!r} (every user is in ExchangeUsers)")
        out[group] = permission
    return out


def secret_ref(value: Any) -> dict:
    """{ username = "...", password_file = "..." }: the secret itself never in this file."""
    if not isinstance(value, dict) or set(value) != {"username", "password_file"}:
        raise ValueError("expected { username = \"...\", password_file = \"...\" } (no inline password)")
    return {"username": text(value["username"]), "password_file": text(value["password_file"])}


@attrs.frozen(kw_only=True)
class DirectoryConfig:
    """Where AUTH credentials are checked: a local file, or LDAP / Active Directory."""

    credentials_file: str | None = setting(text, None, "local users (exedge user add/remove/list): user name, scrypt hash, groups")
    servers: tuple = setting(list_of(ldap_url), (), "LDAP servers in failover order: ldaps://dc1.fabrikam.com (636) or ldap://... (StartTLS)")
    base_dn: str | None = setting(text, None, "where users and groups are searched, e.g. DC=fabrikam,DC=com")
    bind_mode: str = setting(choice("Upn", "Search"), "Upn", "Upn: bind with the name given (AD: user@domain); Search: find the DN with service_account, bind with it")
    service_account: dict | None = setting(secret_ref, None, "{ username, password_file } for Search mode")
    ca_file: str | None = setting(text, None, "CA certificates that sign the directory servers' certificates (default: the system's)")
    timeout: float = setting(timespan(120), 5.0, "connect and answer timeout per directory server")
    group_permissions: dict = setting(group_map, {"Exchange Servers": "ExchangeServers"}, "directory group (cn) = permission group its members hold, nested groups included")
    auth_threads: int = setting(integer(1, 64), 4, "threads that check passwords, so a slow check never blocks the event loop")
    cram_md5_accounts: tuple = setting(list_of(secret_ref), (), "accounts that may also AUTH with CRAM-MD5 (RFC 2195), [{ username, password_file }]: it needs the secret in clear on this server, so only those named here; fetchmail's ODMR mode logs in no other way")


@attrs.frozen(kw_only=True)
class PipelineEntry:
    """One [[pipeline]] table: a stage, where it runs, and its own options (checked by the stage)."""

    stage: str = setting(text, doc="the stage's name: a built-in one or a drop-in plugin's")
    priority: int = setting(integer(0, 10000), 100, "lower runs first")
    enabled: bool = setting(boolean, True, "false: the stage does not run")
    receive_connectors: tuple = setting(list_of(text), (), "connectors it applies to (empty: all)")
    timeout: float = setting(timespan(3600), 30.0, "longest wait for the stage's answer; then 451 4.3.0")
    options: dict = attrs.field(factory=dict, metadata={"parse": dict, "doc": "every other key: the stage's options", "required": False, "per_usage": False})


@attrs.frozen(kw_only=True)
class AcceptedDomain:
    domain_name: str = setting(lambda x: v.parse_domain(x, wildcard=True), doc="domain, or *.domain for it and all its subdomains")
    domain_type: str = setting(choice(*DOMAIN_TYPES), "Authoritative", "Authoritative | InternalRelay | ExternalRelay")
    name: str = setting(name, "", "display name")

    @property
    def is_wildcard(self) -> bool:
        return self.domain_name.startswith("*.")

    def matches(self, domain: str) -> bool:
        if self.is_wildcard:
            base = self.domain_name[2:]
            return domain == base or domain.endswith("." + base)
        return domain == self.domain_name


@attrs.frozen(kw_only=True)
class ReceiveConnector:
    name: str = setting(name, doc="unique connector name")
    usage: str = setting(choice(*USAGES), "Custom", "Client | Custom | Internet | Internal | Partner: sets default permission groups and auth mechanisms")
    bindings: tuple = setting(list_of(v.parse_binding), doc="local \"ip:port\" pairs to listen on")
    remote_ip_ranges: tuple = setting(list_of(v.parse_ip_range), lambda usage: RECEIVE_USAGE_DEFAULTS[usage].get("remote_ip_ranges", _REQUIRED), "peers this connector serves: IPs, a-b ranges, CIDR; most specific match wins", per_usage=True)
    fqdn: str | None = setting(v.parse_fqdn, None, "name in the banner, EHLO reply and Received header (default: [server].fqdn)")
    banner: str | None = setting(text, None, "greeting text, e.g. \"220 mail.example.com\"")
    auth_mechanisms: tuple = setting(list_of(choice(*AUTH_MECHANISMS)), lambda usage: RECEIVE_USAGE_DEFAULTS[usage]["auth_mechanisms"], "None | Tls | BasicAuth | BasicAuthRequireTLS | ExternalAuthoritative", per_usage=True)
    permission_groups: tuple = setting(list_of(choice(*PERMISSION_GROUPS)), lambda usage: RECEIVE_USAGE_DEFAULTS[usage]["permission_groups"], "AnonymousUsers | ExchangeUsers | ExchangeServers | ExchangeLegacyServers | Partners | Custom", per_usage=True)
    max_message_size: int = setting(v.parse_size, 36 * 1024**2, "largest message accepted (SIZE)")
    max_recipients_per_message: int = setting(integer(1, 512000), 200, "RCPTs accepted per message; more get 452 4.5.3")
    max_header_size: int = setting(v.parse_size, 256 * 1024, "largest header section accepted")
    max_hop_count: int = setting(integer(1, 500), 30, "Received headers allowed before a message is refused as a loop")
    connection_timeout: float = setting(v.parse_timespan, 300.0, "longest session, busy or not")
    connection_inactivity_timeout: float = setting(v.parse_timespan, 60.0, "longest wait for the client")
    max_inbound_connection: int | None = setting(integer(1, unlimited=True), 5000, "concurrent sessions on this connector")
    max_inbound_connection_per_source: int | None = setting(integer(1, 10000, unlimited=True), 20, "concurrent sessions per peer address")
    max_inbound_data_sessions: int | None = setting(integer(1, unlimited=True), 200, "sessions in DATA at once on this connector (from the 354 to the end of the data); past it DATA gets 451 4.3.2. A message in flight holds up to 512 KiB in memory, so this bounds that memory")
    max_inbound_data_sessions_per_source: int | None = setting(integer(1, 10000, unlimited=True), 20, "sessions in DATA at once per peer address; past it DATA gets 451 4.3.2 (the default is max_inbound_connection_per_source's: a sender admitted is not refused DATA unless this is lowered)")
    min_inbound_data_rate: int | None = setting(integer(0, 2**31, unlimited=True), 1024, "octets a second a session in DATA must average (over the last 30 s) to keep its slot when max_inbound_data_sessions is reached: a DATA that finds the slots full evicts the slowest session below it (421 4.4.2) instead of getting 451 4.3.2. Postfix's smtpd_min_data_rate; 0 or \"unlimited\": never evict")
    listen_backlog: int = setting(integer(1, 65535), 4096, "connections the kernel holds until they are accepted (listen(2) backlog, capped by net.core.somaxconn); a socket that connectors share gets the largest of theirs")
    max_protocol_errors: int | None = setting(integer(0, unlimited=True), 5, "errors before 421 and disconnect (0 or unlimited: never)")
    tarpit_interval: float = setting(timespan(600), 5.0, "delay before error replies to unauthenticated peers")
    enabled: bool = setting(boolean, True, "false: the connector does not listen")
    pipelining_enabled: bool = setting(boolean, True, "advertise PIPELINING")
    eight_bit_mime_enabled: bool = setting(boolean, True, "advertise 8BITMIME")
    delivery_status_notification_enabled: bool = setting(boolean, True, "advertise DSN")
    protocol_logging_level: str = setting(choice("None", "Verbose"), "None", "Verbose: log every command and reply (and write them to [logs] receive_protocol_log_path)")
    certificate_file: str | None = setting(text, None, "PEM certificate (chain) for STARTTLS; must name fqdn (default: [server].certificate_file)")
    private_key_file: str | None = setting(text, None, "PEM private key of certificate_file (default: the same file)")
    tls_mode: str = setting(choice("StartTls", "Implicit"), "StartTls", "StartTls: offer STARTTLS (with Tls in auth_mechanisms); Implicit: TLS from the first byte (port 465 style)")
    tls_receive_domain_secure_list: tuple = setting(list_of(v.parse_domain), (), "partner domains (domain secure): their mail must come over TLS with a client certificate that names the domain and verifies against tls_client_ca_file")
    tls_client_ca_file: str | None = setting(text, None, "CA certificates that sign partners' client certificates")
    max_logon_failures: int = setting(integer(0, 10), 3, "failed AUTH attempts before 421 and disconnect (0: no limit)")
    auth_tarpit_interval: float = setting(timespan(600), 5.0, "delay before each failed-AUTH reply")
    comment: str = setting(text, "", "free text")

    def effective_fqdn(self, server: ServerConfig) -> str:
        return self.fqdn or server.fqdn


@attrs.frozen
class AddressSpace:
    """One entry of a send connector's AddressSpaces: type, domain pattern, cost."""

    type: str
    domain: str  # "*", "example.com" or "*.example.com"
    cost: int
    text: str = attrs.field(eq=False)

    def match_length(self, domain: str) -> int | None:
        """
        How specifically this address space matches C{domain} (longer is
        more specific), or C{None}. An exact domain beats the wildcard of
        the same name.
        """
        if self.domain == "*":
            return 0
        if self.domain.startswith("*."):
            base = self.domain[2:]
            if domain == base or domain.endswith("." + base):
                return 2 * len(base)
            return None
        return 2 * len(self.domain) + 1 if domain == self.domain else None


def parse_address_space(value: Any) -> AddressSpace:
    if not isinstance(value, str):
        raise ValueError(f"expected an address space such as \"SMTP:*.contoso.com;5\", got {value!r}")
    body = value.strip()
    kind = "SMTP"
    if ":" in body:
        kind, body = body.split(":", 1)
        kind = kind.strip().upper()
        if kind != "SMTP":
            raise ValueError(f"address space {value!r}: only type SMTP is supported")
    cost = 1
    if ";" in body:
        body, cost_text = body.split(";", 1)
        try:
            cost = int(cost_text.strip())
        except ValueError:
            raise ValueError(f"address space {value!r}: cost must be a number 1..100") from None
        if not 1 <= cost <= 100:
            raise ValueError(f"address space {value!r}: cost must be 1..100")
    body = body.strip().lower().rstrip(".")
    if body != "*":
        try:
            body = v.parse_domain(body, wildcard=True)
        except ValueError:
            raise ValueError(f"invalid address space {value!r}") from None
    return AddressSpace(kind, body, cost, value)


def _send_size_default(usage: str) -> int | None:
    return None if usage == "Internal" else 35 * 1024**2


def parse_smart_host(value: Any) -> tuple[str, int]:
    """"mbx01.example.com", "192.0.2.1", "127.0.0.1:2627" or "[2001:db8::1]:25"."""
    if not isinstance(value, str):
        raise ValueError(f"expected a host name or IP address, got {value!r}")
    text = value.strip()
    port = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"invalid smart host {value!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"invalid smart host {value!r}")
        port = int(port_text)
    else:
        host = text
    try:
        v.ipaddress.ip_address(host)
    except ValueError:
        if not v.is_domain(host.rstrip(".")):
            raise ValueError(f"invalid smart host {value!r} (expected an FQDN or IP address)") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"invalid smart host {value!r}: port out of range")
    return host, port if port is not None else 0   # 0: the connector's port


@attrs.frozen(kw_only=True)
class SendConnector:
    name: str = setting(name, doc="unique connector name")
    usage: str = setting(choice(*USAGES), "Custom", "label; Internal connectors have no size limit by default")
    address_spaces: tuple = setting(list_of(parse_address_space), doc="\"SMTP:*.contoso.com;5\", \"contoso.com;1\", \"*\"")
    drop_directory: str | None = setting(text, None, "deliver into this directory, one .eml per message (Exchange's Foreign connector)")
    smart_hosts: tuple = setting(list_of(parse_smart_host), (), "relay through these hosts, in order (FQDN or IP, optional :port)")
    dns_routing_enabled: bool | None = setting(boolean, None, "MX routing through [server].dns_servers (the default without smart_hosts or drop_directory); false with smart_hosts")
    port: int = setting(integer(1, 65535), 25, "port of the smart hosts that do not name one")
    fqdn: str | None = setting(v.parse_fqdn, None, "EHLO name (default: [server].fqdn)")
    smtp_max_messages_per_connection: int = setting(integer(1, 10000), 20, "messages sent on one connection before it is closed")
    connection_inactivity_timeout: float = setting(v.parse_timespan, 600.0, "longest wait for a reply from the next hop")
    max_message_size: int | None = setting(lambda x: v.parse_size(x, allow_unlimited=True), _send_size_default, "largest message this connector carries", per_usage=True)
    enabled: bool = setting(boolean, True, "false: never chosen for routing")
    ignore_start_tls: bool = setting(boolean, False, "never use STARTTLS (Exchange's IgnoreStartTLS)")
    require_tls: bool = setting(boolean, False, "deliver only over TLS; a next hop without STARTTLS is a transient failure")
    tls_auth_level: str | None = setting(choice("EncryptionOnly", "CertificateValidation", "DomainValidation"), None, "with require_tls: what the next hop's certificate must prove (default EncryptionOnly)")
    tls_domain: str | None = setting(v.parse_fqdn, None, "DomainValidation: the name the certificate must carry (default: the host dialled)")
    tls_ca_file: str | None = setting(text, None, "CA certificates for validating next hops (default: the system's)")
    tls_send_domain_secure_list: tuple = setting(list_of(v.parse_domain), (), "partner domains (domain secure, DNS routing): TLS required, their server's certificate must name the domain, and tls_certificate_file is presented")
    tls_certificate_file: str | None = setting(text, None, "client certificate (PEM) presented to next hops that ask, e.g. domain-secure partners")
    tls_private_key_file: str | None = setting(text, None, "its private key (default: the same file)")
    smart_host_auth_mechanism: str = setting(choice("None", "BasicAuth", "BasicAuthRequireTLS", "ExternalAuthoritative"), "None", "how this connector authenticates to its smart hosts")
    authentication_credential: dict | None = setting(secret_ref, None, "{ username, password_file } for BasicAuth to smart hosts")
    schedule: Schedule = setting(parse_schedule, ALWAYS, "when connections may be opened: \"Always\", \"Never\" or weekly windows in 15-minute steps, [\"Mon-Fri 08:00-18:00\", \"Sat 09:00-09:15\"]; outside them its queues are held")
    schedule_time_zone: object = setting(parse_time_zone, None, "IANA time zone the windows are read in, e.g. \"Europe/Berlin\" (default: this server's zone)")
    oversize_threshold: int | None = setting(v.parse_size, None, "messages larger than this wait for oversize_schedule instead (e.g. \"2MB\")")
    oversize_schedule: Schedule | None = setting(parse_schedule, None, "the windows for messages above oversize_threshold (same syntax as schedule)")
    remote_triggered_delivery: bool = setting(boolean, False, "queue mail until the site asks for it (ETRN, ATRN, TURN): its queues, one per domain, never open connections by themselves")
    accept_messages_only_from: tuple = setting(list_of(v.sender_pattern), (), "only these senders' mail may go through this connector (Exchange 2000's Delivery Restrictions): \"user@domain\", \"*@domain\", \"*.domain\", \"<>\" for reports; others go to the next connector by cost, else an NDR 5.7.1")
    reject_messages_from: tuple = setting(list_of(v.sender_pattern), (), "these senders' mail may not go through this connector (same forms)")
    remote_trigger_accounts: tuple = setting(list_of(v.name), (), "accounts (their AUTH names) that may collect this connector's domains with ATRN or TURN")
    protocol_logging_level: str = setting(choice("None", "Verbose"), "None", "Verbose: write every command and reply to the send protocol log ([logs] send_protocol_log_path)")
    comment: str = setting(text, "", "free text")

    def refuses_sender(self, sender: str) -> str | None:
        """Why this connector's delivery restrictions refuse mail from C{sender} ("" for <>), or None."""
        if self.reject_messages_from and v.sender_matches(self.reject_messages_from, sender):
            return f"the sender <{sender}> is in its reject_messages_from"
        if self.accept_messages_only_from and not v.sender_matches(self.accept_messages_only_from, sender):
            return f"the sender <{sender}> is not in its accept_messages_only_from"
        return None


def etrn_server(value: Any) -> tuple[str, int]:
    """"mail.isp.example:25" (the port defaults to 25)."""
    host, port = parse_smart_host(value)
    return host, port or 25


@attrs.frozen(kw_only=True)
class EtrnClient:
    """
    One [[etrn_clients]] table: a provider that holds our mail until we ask
    for it with ETRN (the dial-up site's side). TLS and authentication take
    the keys a send connector uses towards its smart hosts.
    """

    name: str = setting(name, doc="unique name (exedge etrn NAME runs it once)")
    server: tuple = setting(etrn_server, doc="the provider's SMTP server, \"mail.isp.example\" or \"192.0.2.1:2525\" (port 25 by default)")
    domains: tuple = setting(list_of(v.etrn_node), doc="what to ask for: \"branch.example.com\", or \"@example.com\" for it and its subdomains")
    schedule: Schedule | None = setting(parse_schedule, None, "run at each opening of these windows (and every interval inside them); same syntax as a send connector's")
    schedule_time_zone: object = setting(parse_time_zone, None, "IANA time zone of schedule (default: this server's zone)")
    interval: float | None = setting(v.parse_timespan, None, "run this often (inside schedule, when both are set); neither: only on demand (exedge etrn NAME)")
    helo: str | None = setting(v.parse_fqdn, None, "EHLO name (default: [server].fqdn)")
    connection_inactivity_timeout: float = setting(timespan(3600), 60.0, "longest wait for a reply")
    ignore_start_tls: bool = setting(boolean, False, "never use STARTTLS")
    require_tls: bool = setting(boolean, False, "ask only over TLS")
    tls_auth_level: str | None = setting(choice("EncryptionOnly", "CertificateValidation", "DomainValidation"), None, "with require_tls: what the server's certificate must prove")
    tls_domain: str | None = setting(v.parse_fqdn, None, "DomainValidation: the name the certificate must carry (default: the server's name)")
    tls_ca_file: str | None = setting(text, None, "CA certificates for validating the server (default: the system's)")
    smart_host_auth_mechanism: str = setting(choice("None", "BasicAuth", "BasicAuthRequireTLS"), "None", "how to authenticate to the server before ETRN")
    authentication_credential: dict | None = setting(secret_ref, None, "{ username, password_file } for BasicAuth")

    tls_send_domain_secure_list = ()    # what exedge.tls.client_policy asks of a send connector


@attrs.frozen(kw_only=True)
class QueueConfig:
    """Retry and expiry, with Exchange's Edge Transport defaults."""

    queue_glitch_retry_count: int = setting(integer(0, 100), 4, "quick retries after a transient failure of a next hop")
    queue_glitch_retry_interval: float = setting(v.parse_timespan, 60.0, "wait between quick retries")
    outbound_connection_failure_retry_interval: float = setting(
        v.parse_timespan, 1800.0, "wait between retries once the quick ones are used up")
    message_retry_interval: float = setting(v.parse_timespan, 900.0, "wait before retrying recipients a next hop deferred (4xx)")
    delay_notification_timeout: float = setting(v.parse_timespan, 4 * 3600.0,
                                                "after this long undelivered, the sender gets one delay notice")
    message_expiration_timeout: float = setting(v.parse_timespan, 2 * 86400.0,
                                                "after this long undelivered, a message is returned to its sender (NDR 4.4.7)")


_LOG_KINDS = ("receive_protocol_log", "send_protocol_log", "message_tracking_log")


@attrs.frozen(kw_only=True)
class LogsConfig:
    """
    The log files people parse (exedge/logs/): the protocol logs of Verbose
    connectors and the message tracking log. max_age, max_directory_size
    and max_file_size (Exchange's names) apply to every log; each log may
    override them with its own prefixed key, as Exchange's
    Set-TransportService names them (ReceiveProtocolLogMaxAge ->
    receive_protocol_log_max_age).
    """

    receive_protocol_log_path: str = setting(text, "var/log/ProtocolLog/SmtpReceive", "protocol log files of receive connectors with protocol_logging_level = \"Verbose\" (relative to the working directory)")
    send_protocol_log_path: str = setting(text, "var/log/ProtocolLog/SmtpSend", "protocol log files of send connectors with protocol_logging_level = \"Verbose\"")
    message_tracking_log_enabled: bool = setting(boolean, True, "write the message tracking log (exedge Get-MessageTrackingLog searches it)")
    message_tracking_log_path: str = setting(text, "var/log/MessageTracking", "message tracking log files")
    message_tracking_log_subject_logging_enabled: bool = setting(boolean, True, "write the Subject field in the message tracking log")
    max_age: float = setting(v.parse_timespan, 30 * 86400.0, "log files older than this are deleted (every log, unless its own key says otherwise)")
    max_directory_size: int | None = setting(lambda x: v.parse_size(x, allow_unlimited=True), 250 * 1024**2, "the oldest log files are deleted while a log's directory is larger than this (\"unlimited\": never)")
    max_file_size: int = setting(v.parse_size, 10 * 1024**2, "a new log file is begun at this size")
    receive_protocol_log_max_age: float | None = setting(v.parse_timespan, None, "max_age of the receive protocol log")
    receive_protocol_log_max_directory_size: int | None = setting(lambda x: v.parse_size(x, allow_unlimited=True), None, "max_directory_size of the receive protocol log")
    receive_protocol_log_max_file_size: int | None = setting(v.parse_size, None, "max_file_size of the receive protocol log")
    send_protocol_log_max_age: float | None = setting(v.parse_timespan, None, "max_age of the send protocol log")
    send_protocol_log_max_directory_size: int | None = setting(lambda x: v.parse_size(x, allow_unlimited=True), None, "max_directory_size of the send protocol log")
    send_protocol_log_max_file_size: int | None = setting(v.parse_size, None, "max_file_size of the send protocol log")
    message_tracking_log_max_age: float | None = setting(v.parse_timespan, None, "max_age of the message tracking log")
    message_tracking_log_max_directory_size: int | None = setting(lambda x: v.parse_size(x, allow_unlimited=True), None, "max_directory_size of the message tracking log")
    message_tracking_log_max_file_size: int | None = setting(v.parse_size, None, "max_file_size of the message tracking log")

    def limits(self, kind: str) -> dict:
        """max_age, max_directory_size and max_file_size of one log ("receive_protocol_log", ...)."""
        assert kind in _LOG_KINDS
        out = {}
        for key in ("max_age", "max_directory_size", "max_file_size"):
            own = getattr(self, f"{kind}_{key}")
            out[key] = own if own is not None else getattr(self, key)
        return out


@attrs.frozen(kw_only=True)
class ManagementConfig:
    """
    The management endpoint (queues, reload, metrics, the queue viewer):
    on a UNIX socket whose mode (0600) is the access control, and on TCP
    only with a bearer token.
    """

    socket: str = setting(text, "var/run/exedge.sock", "UNIX socket of the management endpoint (mode 0600; relative to the working directory); \"\" = none")
    listen: tuple | None = setting(host_port(8025), None, "also serve the endpoint on TCP at \"ip:port\" (loopback unless allow_remote); needs token_file")
    token_file: str | None = setting(text, None, "file holding the bearer token that TCP clients must send (Authorization: Bearer ...)")
    allow_remote: bool = setting(boolean, False, "let listen be a non-loopback address (the token is still required)")
    max_request_size: int = setting(v.parse_size, 65536, "largest request body the endpoint reads; larger ones get 413")


@attrs.frozen
class FreeSpace:
    """
    A free-space threshold on the spool's file system: a size, a
    percentage of the file system, or both ("500MB or 5%": the smaller
    of the two, so a large disk is not held to its percentage and a small
    one not to a size that is most of it).
    """

    bytes: int | None
    percent: float | None
    text: str = attrs.field(eq=False)

    def of(self, total: int) -> float:
        """The threshold in bytes on a file system of C{total} bytes."""
        parts = []
        if self.bytes is not None:
            parts.append(float(self.bytes))
        if self.percent is not None:
            parts.append(total * self.percent / 100.0)
        return min(parts)

    def __str__(self) -> str:
        return self.text


def free_space(value: Any) -> FreeSpace:
    """"2GB" (or a number of bytes), "10%", or "500MB or 5%"."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a size such as \"2GB\" or a percentage such as \"10%\", got {value!r}")
    if isinstance(value, int):
        return FreeSpace(v.parse_size(value), None, str(value))
    size = percent = None
    parts = [p.strip() for p in value.split(" or ")] if len(value) <= 64 else [value]
    for part in parts:
        if part.endswith("%"):
            number = part[:-1].strip()
            if percent is not None or not number.replace(".", "", 1).isdigit() or not number.isascii():
                raise ValueError(f"invalid free space {value!r} (expected e.g. \"2GB\", \"10%\" or \"500MB or 5%\")")
            percent = float(number)
            if percent > 100:
                raise ValueError(f"{value!r}: a percentage of the file system is at most 100%")
        elif size is None:
            try:
                size = v.parse_size(part)
            except ValueError:
                raise ValueError(f"invalid free space {value!r} (expected e.g. \"2GB\", \"10%\" or "
                                 f"\"500MB or 5%\")") from None
        else:
            raise ValueError(f"invalid free space {value!r}: one size and one percentage at most")
    return FreeSpace(size, percent, value.strip())


@attrs.frozen(kw_only=True)
class BackPressureConfig:
    """
    Exchange's back pressure (exedge/pressure.py): the resources watched
    every few seconds, each Normal, Medium or High by these thresholds.
    Medium refuses MAIL FROM from anonymous sessions, High from every
    session (452 4.3.1); delivery goes on, so the queue drains.
    """

    enabled: bool = setting(boolean, True, "watch the resources and refuse new mail when they run low")
    min_free_space_medium: FreeSpace = setting(free_space, free_space("1GB or 10%"), "Medium below this much free space on the spool's file system: a size, a percentage, or \"1GB or 10%\" (the smaller); a percentage applies to free inodes too")
    min_free_space_high: FreeSpace = setting(free_space, free_space("500MB or 5%"), "High below this much free space (same forms); Postfix's queue_minfree")
    max_memory_medium: int = setting(v.parse_size, 2 * 1024**3, "Medium above this resident memory of the server's processes (receive workers included)")
    max_memory_high: int = setting(v.parse_size, 3 * 1024**3, "High above this resident memory of the server's processes (receive workers included)")
    max_queue_length_medium: int = setting(integer(0), 10000, "Medium above this many messages waiting in the queues (Exchange's SubmissionQueue Medium)")
    max_queue_length_high: int = setting(integer(0), 15000, "High above this many messages waiting in the queues")


@attrs.frozen(kw_only=True)
class Config:
    server: ServerConfig
    queue: QueueConfig = QueueConfig()
    directory: DirectoryConfig = DirectoryConfig()
    management: ManagementConfig = ManagementConfig()
    logs: LogsConfig = LogsConfig()
    back_pressure: BackPressureConfig = BackPressureConfig()
    pipeline: tuple = ()
    etrn_clients: tuple = ()
    accepted_domains: tuple
    receive_connectors: tuple
    send_connectors: tuple
    source: str = ""
    warnings: tuple = ()
    lines: object = attrs.field(default=None, eq=False, repr=False)   # key -> line index of the source

    def problem(self, path: tuple, message: str):
        """A L{Problem} at the line of C{path}, for checks made after loading (files it names)."""
        line = find_line(self.lines, path) if self.lines is not None else None
        return Problem(self.source, line, key_text(path), message)


SECTIONS = {
    "server": (ServerConfig, False),
    "queue": (QueueConfig, False),
    "directory": (DirectoryConfig, False),
    "management": (ManagementConfig, False),
    "logs": (LogsConfig, False),
    "back_pressure": (BackPressureConfig, False),
    "accepted_domains": (AcceptedDomain, True),
    "receive_connectors": (ReceiveConnector, True),
    "send_connectors": (SendConnector, True),
    "pipeline": (PipelineEntry, True),
    "etrn_clients": (EtrnClient, True),
}
