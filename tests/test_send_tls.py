"""
The send side of TLS and smart-host authentication, between two real
exedge servers: the edge relays to a smart host that is another exedge
(its Received header says how the message came in).
"""

import os
import smtplib
import time

from certs import CA
from harness import FROM_INTERNAL_ORG, LOCAL_DROP, LOOPBACK, PORT, server_config
from test_metrics import scrape, value


def edge_config(smart_port, **send):
    """The edge: the internal org's mail, for anywhere, goes to the smart host (C{send}: more of its keys)."""
    return server_config(
        accepted_domains=(),
        receive_connectors=(FROM_INTERNAL_ORG,),
        send_connectors=({"name": "To smart host", "address_spaces": ["*"], "dns_routing_enabled": False,
                          "smart_hosts": [f"127.0.0.1:{smart_port}"], **send},))


def smart_host_config(fqdn, receive, directory=None):
    """The smart host C{fqdn} with partner.test's mailboxes (C{receive}: more keys of its connector from the edge)."""
    return server_config(
        server={"fqdn": fqdn},
        accepted_domains=("partner.test",),
        receive_connectors=({"name": "From edge", "bindings": [LOOPBACK], "remote_ip_ranges": ["127.0.0.1"],
                             "fqdn": fqdn, "tarpit_interval": 0, "auth_tarpit_interval": 0, **receive},),
        send_connectors=(dict(LOCAL_DROP, name="Mailboxes", address_spaces=["partner.test"]),),
        directory=directory)


def send(server, rcpt="bob@partner.test"):
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as c:
        c.sendmail("app@example.com", [rcpt], b"Subject: via smart host\r\nFrom: app@example.com\r\n\r\nhello\r\n")


def received_headers(path) -> str:
    return open(path, "rb").read().split(b"\r\n\r\n")[0].decode()


def test_opportunistic_tls_to_the_next_hop_shows_in_its_received_header(start_server):
    smart = start_server(smart_host_config("mbx01.example.com", {
        "auth_mechanisms": ["Tls"], "permission_groups": ["AnonymousUsers"],
    }))      # a self-signed certificate: fine for opportunistic TLS
    edge = start_server(edge_config(smart.port))
    send(edge)
    headers = received_headers(smart.wait_for(smart.drop_files, what="delivery at the smart host")[0])
    assert "by mbx01.example.com" in headers and "with ESMTPS id" in headers and "version=TLSv1.3" in headers
    # and both sides counted the handshake (the edge when its session ends: it idles for reuse first)
    edge.wait_for(lambda: value(scrape(edge), "exedge_tls_handshakes_total", connector="To smart host",
                                direction="send", outcome="ok") == 1, what="the send side's handshake counted")
    assert value(scrape(smart), "exedge_tls_handshakes_total", connector="From edge", direction="receive",
                 outcome="ok") == 1


def smart_host_with_auth(start_server, tmp_path, names):
    ca = CA(tmp_path)
    cert, key = ca.issue("smart", *names)
    users = tmp_path / "users.txt"
    from exedge.auth.credentials import CredentialsFile
    CredentialsFile(str(users)).add("edge01@fabrikam.com", "Sm4rt!host")
    smart = start_server(smart_host_config(names[0], {
        "auth_mechanisms": ["Tls", "BasicAuth"],        # offers AUTH in plain text too: a client must not use it
        "permission_groups": ["ExchangeUsers"],
        "certificate_file": cert,
        "private_key_file": key,
        "protocol_logging_level": "Verbose",
    }, directory={"credentials_file": users}))
    secret = tmp_path / "smart-host.secret"
    secret.write_text("Sm4rt!host\n")
    os.chmod(secret, 0o600)
    send_keys = {
        "smart_host_auth_mechanism": "BasicAuthRequireTLS",
        "authentication_credential": {"username": "edge01@fabrikam.com", "password_file": secret},
        "tls_ca_file": ca.cert_file,
    }
    return smart, send_keys


def test_basic_auth_require_tls_to_a_smart_host_whose_certificate_names_it(start_server, tmp_path):
    # smart_hosts names 127.0.0.1: the certificate must carry exactly that
    smart, send_keys = smart_host_with_auth(start_server, tmp_path, ["mbx01.example.com", "127.0.0.1"])
    edge = start_server(edge_config(smart.port, **send_keys))
    send(edge)
    headers = received_headers(smart.wait_for(smart.drop_files, what="delivery at the smart host")[0])
    assert "with ESMTPSA id" in headers
    assert "authenticated as edge01@fabrikam.com" in smart.log
    assert "Sm4rt!host" not in edge.log and "Sm4rt!host" not in smart.log


def test_smart_host_certificate_with_another_name_gets_no_credentials_and_no_mail(start_server, tmp_path):
    smart, send_keys = smart_host_with_auth(start_server, tmp_path, ["mbx01.example.com"])
    edge = start_server(edge_config(smart.port, **send_keys))
    send(edge)
    edge.wait_for(lambda: "transient failure" in edge.log, what="the failed attempt")
    assert "VerificationError" in edge.log and "Mismatch" in edge.log           # the name check stopped it
    time.sleep(0.5)
    assert smart.drop_files() == []
    assert ",<,AUTH" not in smart.log and "authenticated as" not in smart.log   # no credentials were sent
    assert len(os.listdir(edge.path("var", "spool", "queue"))) == 1           # still queued, for a retry


def partner_config(cert, key, ca):
    """contoso.test's server: a probe connector, and one for domain-secure partners on 127.0.0.9."""
    return server_config(
        server={"fqdn": "mail.contoso.test"},
        accepted_domains=("contoso.test",),
        receive_connectors=(
            {"name": "Probe", "bindings": [LOOPBACK], "remote_ip_ranges": ["127.0.0.1"],
             "auth_mechanisms": ["None"], "permission_groups": ["AnonymousUsers"]},
            {"name": "From partners", "usage": "Partner", "bindings": [f"127.0.0.9:{PORT}"],
             "remote_ip_ranges": ["127.0.0.0/8"], "fqdn": "mail.contoso.test",
             "certificate_file": cert, "private_key_file": key,
             "tls_receive_domain_secure_list": ["fabrikam.test"], "tls_client_ca_file": ca, "tarpit_interval": 0},
        ),
        send_connectors=(dict(LOCAL_DROP, name="Mailboxes", address_spaces=["contoso.test"]),))


def edge_to_partner_config(dns_port, partner_port, cert, key, ca):
    """fabrikam.test's edge: mail for contoso.test goes, by MX, over mutual TLS with a client certificate."""
    return server_config(
        server={"fqdn": "edge01.fabrikam.test", "dns_servers": [f"127.0.0.1:{dns_port}"]},
        accepted_domains=(),
        receive_connectors=(FROM_INTERNAL_ORG,),
        send_connectors=(
            {"name": "To partners", "address_spaces": ["contoso.test"], "port": partner_port,
             "tls_send_domain_secure_list": ["contoso.test"],
             "tls_certificate_file": cert, "tls_private_key_file": key, "tls_ca_file": ca},
            {"name": "Test address allowance", "address_spaces": ["unused.invalid"], "smart_hosts": ["127.0.0.9"],
             "dns_routing_enabled": False, "enabled": False},
        ))


def mutual_tls(start_server, dns_zones, tmp_path, partner_names):
    ca = CA(tmp_path)
    partner_cert, partner_key = ca.issue("partner", *partner_names)
    edge_cert, edge_key = ca.issue("edge-client", "fabrikam.test", "edge01.fabrikam.test", client=True)
    partner = start_server(partner_config(partner_cert, partner_key, ca.cert_file))
    dns_port = dns_zones({"contoso.test": {
        "contoso.test": [["MX", 10, "mail.contoso.test"]], "mail.contoso.test": [["A", "127.0.0.9"]]}})
    edge = start_server(edge_to_partner_config(dns_port, partner.port, edge_cert, edge_key, ca.cert_file))
    with smtplib.SMTP("127.0.0.1", edge.port, timeout=10) as c:
        c.sendmail("app@fabrikam.test", ["bob@contoso.test"], b"Subject: partner\r\n\r\nmutual TLS\r\n")
    return edge, partner


def test_domain_secure_partners_get_mail_over_mutual_tls(start_server, dns_zones, tmp_path):
    edge, partner = mutual_tls(start_server, dns_zones, tmp_path, ["mail.contoso.test", "contoso.test"])
    headers = received_headers(partner.wait_for(partner.drop_files, what="delivery to the partner")[0])
    assert "with ESMTPS id" in headers and "client certificate verified for fabrikam.test" in headers


def test_a_partner_server_whose_certificate_does_not_name_the_domain_gets_nothing(start_server, dns_zones, tmp_path):
    edge, partner = mutual_tls(start_server, dns_zones, tmp_path, ["mail.contoso.test"])
    edge.wait_for(lambda: "transient failure" in edge.log, what="the refused attempt")
    assert "VerificationError" in edge.log
    time.sleep(0.3)
    assert partner.drop_files() == [] and len(os.listdir(edge.path("var", "spool", "queue"))) == 1
