"""
The management endpoint against a running server: the queue verbs with
messages held (Unreachable) and in retry (a smart host that is down), the
command line's view of them, and the endpoint's refusals.
"""

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request

import pytest

from harness import free_port, read_log
from manage_scenario import (EXEDGE, TOKEN, client_of, config, exedge, held_and_retrying, queues_by_hop,
                             send)

from exedge.manage.client import EndpointError


def test_the_queues_held_and_in_retry_as_admins_see_them(start_server):
    server = start_server(config(free_port()))
    assert stat.S_IMODE(os.stat(server.path("var", "run", "exedge.sock")).st_mode) == 0o600
    with client_of(server) as client:
        queues = held_and_retrying(server, client)
        partner, unreachable = queues["To Partner"], queues["Unreachable"]
        assert partner["message_count"] == 1 and partner["next_retry_time"]
        assert "refused" in partner["last_error"].lower() or "connect" in partner["last_error"].lower()
        assert unreachable["status"] == "Held" and unreachable["message_count"] == 1
        assert unreachable["identity"] == "edge01\\Unreachable"
        assert "no send connector" in unreachable["hold_reason"]

        [held] = client.messages("Unreachable")
        assert held["from_address"] == "alice@example.com" and held["subject"] == "nobody routes me"
        assert held["recipients"] == [{"address": "carol@other.test", "status": "Held", "queue": "Unreachable",
                                       "last_error": ""}]
        [waiting] = client.messages(partner["id"])
        assert waiting["recipients"][0]["status"] == "Retry"
        assert waiting["queue"] == [partner["id"]]
        assert b"Subject: nobody routes me" in client.export(held["identity"])

    listing = exedge(server, "queue", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["Identity", "DeliveryType", "Status"]
    assert any("edge01\\Unreachable" in line and "Held" in line for line in lines)
    assert any("To Partner" in line or "Retry" in line for line in lines)
    as_json = json.loads(exedge(server, "queue", "list", "--json").stdout)
    assert {q["status"] for q in as_json} == {"Held", "Retry"}


def test_retry_suspend_resume_and_remove(start_server, sinks):
    port = free_port()
    server = start_server(config(port))
    with client_of(server) as client:
        queues = held_and_retrying(server, client)
        partner = queues["To Partner"]["id"]
        [waiting] = client.messages(partner)
        [held] = client.messages("Unreachable")

        client.message_action(waiting["identity"], "suspend")
        assert client.messages(partner)[0]["status"] == "Suspended"
        sink = sinks("partner", port=port)
        client.queue_action(partner, "retry")          # the queue runs; the suspended message stays
        send(server, "dave@partner.test", "not suspended")
        server.wait_for(lambda: len(sink.files()) == 1, what="the message that is not suspended")
        assert b"not suspended" in sink.files()[0]
        assert [m["status"] for m in client.messages(partner)] == ["Suspended"]

        client.message_action(waiting["identity"], "resume")
        server.wait_for(lambda: len(sink.files()) == 2, what="the resumed message")
        with pytest.raises(EndpointError) as refused:
            client.message_action(held["identity"], "resume")
        assert refused.value.status == 409 and "not suspended" in str(refused.value)

        client.message_action(held["identity"], "remove", {"ndr": True})
        ndr = server.wait_for(server.drop_files, what="the NDR of the removed message")
        with open(ndr[0], "rb") as f:
            report = f.read()
        assert b"X-Receiver: <alice@example.com>" in report
        assert b"deleted by administrative action" in report
        # the NDR's file is written before its outcome is recorded: the queue empties just after
        server.wait_for(lambda: client.messages() == [], what="the delivered NDR gone from the queue")
        with pytest.raises(EndpointError) as gone:
            client.export(held["identity"])
        assert gone.value.status == 404
    server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty spool")


def test_redirect_and_remove_without_ndr(start_server):
    server = start_server(config(free_port()))
    with client_of(server) as client:
        queues = held_and_retrying(server, client)
        client.queue_action(queues["To Partner"]["id"], "redirect", {"connector": "Local drop"})
        [dropped] = server.wait_for(server.drop_files, what="the redirected message")
        with open(dropped, "rb") as f:
            assert b"X-Receiver: <bob@partner.test>" in f.read()

        with pytest.raises(EndpointError) as unknown:
            client.queue_action("Unreachable", "redirect", {"connector": "Nowhere"})
        assert unknown.value.status == 409 and "Local drop" in str(unknown.value)

        [held] = client.messages("Unreachable")
        client.message_action(held["identity"], "remove", {"ndr": False})
        assert client.messages() == []
    server.wait_for(lambda: not os.listdir(server.path("var", "spool", "queue")), what="an empty spool")
    assert len(server.drop_files()) == 1          # no NDR
    dropped = server.wait_for(lambda: json.loads(exedge(server, "Get-MessageTrackingLog", "-EventId", "DROP",
                                                        "--json").stdout), what="the DROP in the tracking log")
    assert [(r["InternalMessageId"], r["Recipients"]) for r in dropped] == [(held["identity"], ["carol@other.test"])]
    assert "deleted by administrative action" in dropped[0]["RecipientStatus"][0]


def test_flush_retries_what_waits(start_server, sinks):
    port = free_port()
    server = start_server(config(port))
    with client_of(server) as client:
        held_and_retrying(server, client)
        sink = sinks("partner", port=port)
        flushed = exedge(server, "queue", "flush")
        assert flushed.returncode == 0 and "retried 1 queue(s)" in flushed.stdout, flushed
        server.wait_for(sink.files, what="the flushed message")
        assert [q["connector"] for q in client.queues() if q["message_count"]] == ["Unreachable"]


# -- the endpoint's refusals ------------------------------------------------------

def call(url, method="GET", body=None, token=TOKEN, headers=()):
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_tcp_needs_the_token(tcp_server):
    server, base = tcp_server
    assert call(base + "/api/status")[0] == 200
    for token in (None, "wrong", TOKEN[:-1], TOKEN + "x", ""):
        status, body = call(base + "/api/queues", token=token)
        assert status == 401, token
        assert json.loads(body)["status"] == 401
    status, _ = call(base + "/api/status", token=None, headers={"Authorization": f"Basic {TOKEN}"}.items())
    assert status == 401


@pytest.mark.parametrize("path", [
    "/api/messages/../../../etc/passwd", "/api/queues/..%2f..%2fetc", "/api/queues/%00", "/api/messages/abc",
    "/api/queues/" + "9" * 40, "/api//queues", "/API/QUEUES", "/api/queues/1/messages/../../status",
    "/api/messages/0000000000000000000000/../eml", "/api/queues/Unreachable/retry/x",
])
def test_path_tricks_find_nothing(tcp_server, path):
    server, base = tcp_server
    status, body = call(base + path)
    assert status in (404, 405), (path, status, body)
    assert "error" in json.loads(body)


def test_bad_requests_get_json_errors(tcp_server):
    server, base = tcp_server
    status, body = call(base + "/api/reload", "POST", b"x" * 200_000)
    assert status == 413 and b"larger than" in body
    status, body = call(base + "/api/queues/Unreachable/retry", "POST", b"{not json")
    assert status == 400 and json.loads(body)["error"] == "the body must be a JSON object"
    status, body = call(base + "/api/queues/Unreachable/retry", "POST", b'{"resubmit": "yes"}')
    assert status == 400 and b"true or false" in body
    status, body = call(base + "/api/queues", "DELETE")
    assert status == 405
    status, body = call(base + "/api/queues/Unreachable/retry")
    assert status == 405
    status, body = call(base + "/api/messages/0123456789ABCDEF0123", "GET")
    assert status == 404
    for limit in ("0", "abc", "99999999", "1%3B2", "-1"):
        status, body = call(base + f"/api/messages?limit={limit}")
        assert status == 400 and b"limit must be a number" in body, limit
    status, body = call(base + "/api/queues/42/suspend", "POST", b"{}")
    assert status == 404 and b"no queue" in body
    # the server is still there, and said nothing of a traceback
    assert call(base + "/api/status")[0] == 200
    assert "Traceback" not in read_log(server.log_path)


def test_remote_listen_needs_allow_remote_and_a_token(tmp_path):
    path = tmp_path / "exedge.toml"
    path.write_text(config(free_port(), '\n[management]\nlisten = "0.0.0.0:8025"\n').format(port=free_port()))
    checked = subprocess.run([EXEDGE, "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 1
    assert "management.listen" in checked.stdout and "token_file" in checked.stdout
    assert "allow_remote" in checked.stdout


def test_status_says_what_runs(start_server):
    server = start_server(config(free_port()))
    result = exedge(server, "status")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["server"] == "edge01.example.com" and status["pid"] == server.proc.pid
    [connector] = status["receive_connectors"]
    assert connector["name"] == "From Internal Org" and connector["listening"] is True
    assert status["spool"]["messages"] == 0


def test_commands_say_when_no_server_runs(tmp_path):
    path = tmp_path / "exedge.toml"
    path.write_text(config(free_port()).format(port=free_port()))
    result = subprocess.run([EXEDGE, "queue", "list", "--config", str(path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no exedge server answers on unix:var/run/exedge.sock" in result.stderr
    assert "Traceback" not in result.stderr


# -- the Exchange-named cmdlets -----------------------------------------------------

def test_the_queue_cmdlets_as_exchange_admins_type_them(start_server, tmp_path):
    server = start_server(config(free_port()))
    with client_of(server) as client:
        queues = held_and_retrying(server, client)
    partner = queues["To Partner"]["id"]

    listing = exedge(server, "Get-Queue")
    assert listing.returncode == 0, listing.stderr
    header = listing.stdout.splitlines()[0].split()
    assert header == ["Identity", "DeliveryType", "Status", "MessageCount", "NextRetryTime", "NextHopDomain",
                      "LastError"]
    assert "edge01\\Unreachable" in listing.stdout and "Retry" in listing.stdout

    shown = exedge(server, "ps", "Get-Queue -Identity Unreachable | Format-List Identity,Status,LastError")
    assert shown.returncode == 0, shown.stderr
    assert "Identity  : edge01\\Unreachable" in shown.stdout and "Status    : Held" in shown.stdout

    [held] = json.loads(exedge(server, "Get-Message", "-Queue", "Unreachable", "--json").stdout)
    assert held["FromAddress"] == "alice@example.com" and held["Recipients"] == ["carol@other.test"]
    [waiting] = json.loads(exedge(server, "Get-Message", "-Queue", f"edge01\\{partner}", "--json").stdout)
    # two messages in all: a page of one says so (Exchange's -ResultSize), oldest first
    first = exedge(server, "Get-Message", "-ResultSize", "1", "--json")
    assert first.returncode == 0 and "2 messages; showing the first 1" in first.stderr, first.stderr
    assert [m["Identity"] for m in json.loads(first.stdout)] == [held["Identity"]]
    with client_of(server) as client:
        page = client.message_page(limit=1)
        assert (page["total"], page["truncated"], len(page["messages"])) == (2, True, 1)
        assert client.message_page(limit=None)["truncated"] is False
    other = exedge(server, "Get-Message", waiting["Identity"], "-Queue", "Unreachable")
    assert other.returncode == 1 and f"no message {waiting['Identity']} in queue Unreachable" in other.stderr
    gone = exedge(server, "Get-Message", "edge01\\0000000000000000DEAD")        # a well-formed id nobody has
    assert gone.returncode == 1 and "no message 0000000000000000DEAD in the queues" in gone.stderr, gone.stderr

    out = tmp_path / "held.eml"
    exported = exedge(server, "Export-Message", "-Identity", held["Identity"], "-Path", str(out))
    assert exported.returncode == 0, exported.stderr
    assert b"Subject: nobody routes me" in out.read_bytes() and stat.S_IMODE(out.stat().st_mode) == 0o600
    again = exedge(server, "Export-Message", "-Identity", held["Identity"], "-Path", str(out))
    assert again.returncode == 1 and "File exists" in again.stderr

    assert exedge(server, "ps", f"Suspend-Message {waiting['Identity']}").returncode == 0
    [suspended] = json.loads(exedge(server, "Get-Message", waiting["Identity"], "--json").stdout)
    assert suspended["Status"] == "Suspended"
    assert exedge(server, "Resume-Message", "-Identity", waiting["Identity"]).returncode == 0

    assert exedge(server, "ps", f"Suspend-Queue -Identity edge01\\{partner}").returncode == 0
    assert json.loads(exedge(server, "Get-Queue", partner, "--json").stdout)[0]["Status"] == "Suspended"
    refused = exedge(server, "Retry-Queue", "-Identity", partner)
    assert refused.returncode == 1 and "resume it" in refused.stderr
    assert exedge(server, "Resume-Queue", partner).returncode == 0

    removed = exedge(server, "ps", f"Remove-Message -Identity {held['Identity']} -WithNDR $false")
    assert removed.returncode == 0, removed.stderr
    assert json.loads(exedge(server, "Get-Message", "-Queue", "Unreachable", "--json").stdout) == []
    assert server.drop_files() == []

    for line in ("Suspend-Queue -Identity ../../etc", "Get-Message -Identity 'x;rm -rf /'", "Retry-Queue"):
        bad = exedge(server, "ps", line)
        assert bad.returncode == 1 and "Traceback" not in bad.stderr, (line, bad.stderr)


def test_a_configuration_cmdlet_reloads_the_running_server(start_server):
    """New-SendConnector edits the file the server runs on and asks it to reload: held mail goes out."""
    server = start_server(config(free_port()))
    send(server, "carol@other.test", "waiting for a connector")
    with client_of(server) as client:
        server.wait_for(lambda: queues_by_hop(client).get("Unreachable"), what="the held message")
    made = exedge(server, "ps", 'New-SendConnector -Name "To Other" -Custom -AddressSpaces other.test '
                                '-DropDirectory var/drop2')
    assert made.returncode == 0, made.stderr
    assert "the running server reloaded its configuration" in made.stderr
    server.wait_for(lambda: os.path.isdir(server.path("var", "drop2")) and os.listdir(server.path("var", "drop2")),
                    what="the held message through the new connector")
