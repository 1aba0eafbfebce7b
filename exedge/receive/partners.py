"""
Exchange's domain security on a receive connector: what a client's TLS
certificate proves.

A receive connector with a tls_receive_domain_secure_list takes mail from
those partner domains only over TLS, from a client whose certificate
verifies against the partner CA (tls_client_ca_file) and names the
domain; such a client, on a connector with the Partners permission group,
holds the rights of MS Exchange\\Partner Servers. The session asks this
object at EHLO (inside TLS) and at MAIL FROM; it also describes the TLS
session for our Received field. The certificate is verified once per
session, when first needed.
"""

from __future__ import annotations

from exedge import tls

from .reply import Reply


class DomainSecurity:
    """C{store}: the partner CA's X509Store for this connector, or None; C{note(text)}: the protocol log."""

    def __init__(self, connector, store, transport, note):
        self.connector = connector
        self.store = store
        self.transport = transport
        self.note = note
        self._certificate = None           # (verified certificate or None, why)
        self._described: str | None = None

    def certificate(self):
        """The client's certificate verified against the partner CA: (certificate or None, why not)."""
        if self._certificate is None:
            self._certificate = (tls.verified_client_certificate(self.transport, self.store)
                                 if self.store is not None else (None, "no partner CA for this connector"))
        return self._certificate

    def describe(self) -> str:
        """The TLS session for our Received field (worked out once per session)."""
        if self._described is None:
            verified = self.certificate()[0] if self.store is not None else None
            self._described = tls.describe(self.transport, verified) or "TLS"
        return self._described

    def partners(self) -> list[str]:
        r"""
        The domain-secure partners this client's certificate proves it is
        a server of: it then holds MS Exchange\Partner Servers, as a
        domain-secured session does in Exchange. Nothing without the
        Partners permission group (the peer stays what it was).
        """
        c = self.connector
        if not c.tls_receive_domain_secure_list or "Partners" not in c.permission_groups:
            return []
        cert, _ = self.certificate()
        return [d for d in c.tls_receive_domain_secure_list if cert is not None and tls.names_domain(cert, d)]

    def check_sender(self, sender, tls_active: bool) -> Reply | None:
        """
        Mail from a partner domain must come over TLS from a client whose
        certificate verifies against the partner CA and names that domain;
        the refusal if it does not, else None.
        """
        if sender is None or sender.is_literal or sender.domain.lower() not in self.connector.tls_receive_domain_secure_list:
            return None
        if not tls_active:
            self.note(f"domain secure: {sender.domain} without TLS")
            return Reply(451, "4.7.1", f"Mail from {sender.domain} must use TLS with a client certificate",
                         tarpit=True)
        cert, why = self.certificate()
        if cert is None or not tls.names_domain(cert, sender.domain):
            why = why or f"client certificate names {', '.join(tls.certificate_names(cert)) or 'nothing'}, " \
                         f"not {sender.domain}"
            self.note(f"domain secure: {sender.domain} refused: {why}")
            return Reply(550, "5.7.1", f"Domain secure: {why}", tarpit=True)
        return None
