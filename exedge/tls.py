"""
TLS for receive connectors: certificates checked at start-up, contexts
built once, and what a session's TLS was, for the Received header.

A connector that offers Tls must present a certificate that names its
FQDN (checked with service_identity, as a client would): a mismatch is a
configuration error at start-up, not a surprise for the first partner
that validates. A connector with Tls and no certificate anywhere gets a
self-signed one made at start-up for its FQDN, as Exchange does at
install, so STARTTLS works out of the box for opportunistic peers; the
log says so.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import ssl
from twisted.logger import Logger

from exedge.config import Config, ConfigError

log = Logger()


def self_signed(fqdn: str, days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) naming C{fqdn}: an EC P-256 key, in memory only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(fqdn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _pem_certificates(data: bytes) -> list:
    return x509.load_pem_x509_certificates(data)


class _AskForClientCertificate(ssl.CertificateOptions):
    """
    Asks the client for a certificate and takes whatever it presents: many
    MTAs present self-signed ones, and failing their handshake would cost
    mail that needs no proof. Whether a certificate proves a partner's
    domain is decided later, at MAIL, by L{verified_client_certificate}.
    """

    def _makeContext(self):
        context = super()._makeContext()
        context.set_verify(SSL.VERIFY_PEER, lambda connection, cert, errno, depth, ok: True)
        return context


def server_options(cert_pem: bytes, key_pem: bytes, ask_client: bool = False) -> ssl.CertificateOptions:
    """Modern defaults: TLS 1.2 or later, Twisted's cipher choice, the chain as given."""
    chain = _pem_certificates(cert_pem)
    kind = _AskForClientCertificate if ask_client else ssl.CertificateOptions
    return kind(
        privateKey=crypto.PKey.from_cryptography_key(serialization.load_pem_private_key(key_pem, None)),
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def receive_contexts(config: Config) -> dict[str, ssl.CertificateOptions]:
    """
    The TLS options of every receive connector that offers Tls, by name.
    Raises L{ConfigError} naming the key and line of each certificate that
    cannot be read, has no matching key, or does not name the connector's FQDN.
    """
    contexts: dict[str, ssl.CertificateOptions] = {}
    problems = []
    made: dict[str, ssl.CertificateOptions] = {}
    for i, rc in enumerate(config.receive_connectors):
        if "Tls" not in rc.auth_mechanisms or not rc.enabled:
            continue
        fqdn = rc.effective_fqdn(config.server)
        if rc.certificate_file:
            where, cert_file, key_file = ("receive_connectors", i), rc.certificate_file, rc.private_key_file
        elif config.server.certificate_file:
            where, cert_file, key_file = ("server",), config.server.certificate_file, config.server.private_key_file
        else:
            key = (fqdn, bool(rc.tls_receive_domain_secure_list))
            if key not in made:
                made[key] = server_options(*self_signed(fqdn), ask_client=key[1])
                log.warn("receive connector {name}: no certificate_file; STARTTLS uses a self-signed "
                         "certificate for {fqdn}", name=rc.name, fqdn=fqdn)
            contexts[rc.name] = made[key]
            continue
        key_file = key_file or cert_file
        try:
            cert_pem = _read(cert_file)
            key_pem = cert_pem if key_file == cert_file else _read(key_file)
        except OSError as e:
            key = "certificate_file" if e.filename == cert_file else "private_key_file"
            problems.append(config.problem(where + (key,), f"cannot read {e.filename}: {e.strerror}"))
            continue
        try:
            leaf = _pem_certificates(cert_pem)[0]
        except ValueError as e:
            problems.append(config.problem(where + ("certificate_file",), f"{cert_file}: not a PEM certificate ({e})"))
            continue
        try:
            verify_certificate_hostname(leaf, fqdn)
        except VerificationError:
            names = certificate_names(leaf)
            problems.append(config.problem(
                where + ("certificate_file",),
                f"{cert_file} names {', '.join(names) or 'nothing'}, not {fqdn} "
                f"(the fqdn of receive connector {rc.name!r}): clients that check would refuse it"))
            continue
        try:
            contexts[rc.name] = server_options(cert_pem, key_pem, ask_client=bool(rc.tls_receive_domain_secure_list))
        except Exception as e:   # a key that does not parse or does not match the certificate
            problems.append(config.problem(where + ("private_key_file",),
                                           f"{key_file}: no usable private key for {cert_file} ({e})"))
    if problems:
        raise ConfigError(problems)
    return contexts


def client_ca_stores(config: Config) -> dict:
    """Receive connector name -> an X509Store of its tls_client_ca_file (ConfigError if unreadable)."""
    stores, problems = {}, []
    for i, rc in enumerate(config.receive_connectors):
        if not rc.tls_client_ca_file:
            continue
        try:
            certs = _pem_certificates(_read(rc.tls_client_ca_file))
        except (OSError, ValueError) as e:
            problems.append(config.problem(("receive_connectors", i, "tls_client_ca_file"),
                                           f"cannot read CA certificates from {rc.tls_client_ca_file}: {e}"))
            continue
        store = crypto.X509Store()
        for c in certs:
            store.add_cert(crypto.X509.from_cryptography(c))
        stores[rc.name] = store
    if problems:
        raise ConfigError(problems)
    return stores


def verified_client_certificate(transport, store):
    """
    (the client's certificate, "") when it verifies against C{store}, else
    (None, why); the certificate is a C{cryptography} one.
    """
    connection = getattr(transport, "getHandle", lambda: None)()
    leaf = connection.get_peer_certificate() if hasattr(connection, "get_peer_certificate") else None
    if leaf is None:
        return None, "no client certificate"
    chain = connection.get_peer_cert_chain() or []
    intermediates = [c for c in chain if c.digest("sha256") != leaf.digest("sha256")]
    try:
        crypto.X509StoreContext(store, leaf, chain=intermediates).verify_certificate()
    except crypto.X509StoreContextError as e:
        return None, f"client certificate does not verify: {e}"
    return leaf.to_cryptography(), ""


def names_domain(cert, domain: str) -> bool:
    """Does C{cert} name C{domain}? (service_identity's rules, as for server certificates)"""
    try:
        verify_certificate_hostname(cert, domain)
    except VerificationError:
        return False
    return True


def certificate_names(cert) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def describe(transport, verified=None) -> str | None:
    """
    "version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256/256; no client
    certificate" for a TLS transport, None for plain text. C{verified}: the
    client certificate, when the session has verified it.
    """
    connection = getattr(transport, "getHandle", lambda: None)()
    get_cipher = getattr(connection, "get_cipher_name", None)
    if get_cipher is None or get_cipher() is None:
        return None
    text = (f"version={connection.get_protocol_version_name()} cipher={get_cipher()} "
            f"bits={connection.get_cipher_bits()}")
    peer = connection.get_peer_certificate()
    if peer is None:
        return text + "; no client certificate"
    if verified is not None:
        return text + f"; client certificate verified for {', '.join(certificate_names(verified)[:3])}"
    return text + "; client certificate presented, not verified"


# -- sending -------------------------------------------------------------------


def _trust(ca_file: str | None):
    if not ca_file:
        return ssl.platformTrust()
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in _pem_certificates(_read(ca_file))])


def send_client_certificates(config: Config) -> dict:
    """Send connector name -> the PrivateCertificate it presents (ConfigError if unusable)."""
    found, problems = {}, []
    for i, c in enumerate(config.send_connectors):
        if not c.tls_certificate_file:
            continue
        key_file = c.tls_private_key_file or c.tls_certificate_file
        try:
            cert_pem = _read(c.tls_certificate_file)
            key_pem = cert_pem if key_file == c.tls_certificate_file else _read(key_file)
            found[c.name] = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        except Exception as e:
            problems.append(config.problem(("send_connectors", i, "tls_certificate_file"),
                                           f"cannot load {c.tls_certificate_file} with its key: {e}"))
    if problems:
        raise ConfigError(problems)
    return found


def client_policy(connector, host: str, domain: str = "", client_certificate=None):
    """
    (TLS options or None, TLS required) for a session of this send
    connector to C{host} (the smart host as configured, or the MX host).

    EncryptionOnly (the default, opportunistic) accepts any certificate;
    CertificateValidation checks the chain; DomainValidation also the name
    (tls_domain, or the host dialled). BasicAuthRequireTLS to a smart host
    means DomainValidation against the smart host's configured name, as
    Exchange requires, so credentials go only to the host they are for.
    When TLS is not required, a failed handshake is followed by the same
    host in plain text (L{exedge.send.relay}).
    """
    if connector.ignore_start_tls:
        return None, False
    if domain and domain.lower() in connector.tls_send_domain_secure_list:
        # domain security: mutual TLS, and the partner's server must be the partner's
        return ssl.optionsForClientTLS(domain.lower(), trustRoot=_trust(connector.tls_ca_file),
                                       clientCertificate=client_certificate), True
    level = connector.tls_auth_level or "EncryptionOnly"
    name = connector.tls_domain or host
    # a level to prove means TLS is required (the loader insists on
    # require_tls too): never a plain-text fallback around it
    required = connector.require_tls or connector.tls_auth_level is not None
    if connector.smart_host_auth_mechanism == "BasicAuthRequireTLS":
        level, name, required = "DomainValidation", host, True
    mine = {}
    if client_certificate is not None:
        mine = {"privateKey": client_certificate.privateKey.original,
                "certificate": client_certificate.original}
    if level == "EncryptionOnly":
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **mine), required
    trust = _trust(connector.tls_ca_file)
    if level == "CertificateValidation":
        return ssl.CertificateOptions(trustRoot=trust, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **mine), required
    return ssl.optionsForClientTLS(name, trustRoot=trust, clientCertificate=client_certificate), required
