"""
`exedge check-config --defaults` (pasteable TOML) and `exedge check-config
-n` / `exedge show-config -n` (postconf -n), run through the real console
script; the stages' declared defaults checked against their constructors.
"""

import inspect
import os
import re
import textwrap
import tomllib

import pytest

from exedge.config import loads
from exedge.pipeline.registry import builtins

from test_cli import ROOT, run

# what the test writes for each "# key =  (required...)" line of --defaults, by section: the
# way an admin fills the document in before using it
REQUIRED = {
    "accepted_domains": {"domain_name": '"example.com"'},
    "receive_connectors": {"name": '"From Internet"', "bindings": '["127.0.0.1:2525"]',
                           "remote_ip_ranges": '["0.0.0.0/0"]'},
    "send_connectors": {"name": '"To Internet"', "address_spaces": '["*"]'},
    "etrn_clients": {"name": '"Provider"', "server": '"192.0.2.1"', "domains": '["example.com"]'},
}
_REQUIRED_LINE = re.compile(r"^# (\w+) =  \(required")
_SECTION = re.compile(r"^\[\[?(\w+)\]\]?$")


def defaults_text() -> str:
    result = run("check-config", "--defaults")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def filled(text: str, **changes) -> str:
    """The --defaults document with its required keys given values, and C{changes} ("key = old" -> "key = new")."""
    out, section = [], None
    for line in text.splitlines():
        header = _SECTION.match(line)
        if header:
            section = header.group(1)
        required = _REQUIRED_LINE.match(line)
        if required:
            line = f"{required.group(1)} = {REQUIRED[section][required.group(1)]}"
        out.append(line)
    text = "\n".join(out) + "\n"
    for old, new in changes.items():
        text = text.replace(old, new)
    return text


def test_defaults_are_toml_with_every_section_and_a_doc_comment():
    text = defaults_text()
    raw = tomllib.loads(text)           # valid as printed, required keys commented out
    assert set(raw) == {"server", "queue", "directory", "management", "logs", "back_pressure", "accepted_domains",
                        "receive_connectors", "send_connectors", "etrn_clients", "pipeline"}
    for header in ("[server]", "[queue]", "[directory]", "[management]", "[logs]", "[back_pressure]",
                   "[[accepted_domains]]",
                   "[[receive_connectors]]",
                   "[[send_connectors]]", "[[etrn_clients]]", "[[pipeline]]"):
        assert header + "\n" in text
    # the doc above the key, the default as the loader's spelling
    assert '# largest message accepted (SIZE)\nmax_message_size = "36MB"\n' in text
    assert 'message_expiration_timeout = "2d"' in text
    assert 'group_permissions = {"Exchange Servers" = "ExchangeServers"}' in text
    assert "# certificate_file =  (not set)" in text
    assert "# fqdn =  (computed at start-up)" in text
    assert "# remote_ip_ranges =  (required with usage Custom)" in text
    assert 'Internal: "unlimited"' in text              # a send connector's size by usage
    assert 'min_free_space_high = "500MB or 5%"' in text   # a threshold as it was written


def test_defaults_filled_in_load_and_mean_the_defaults():
    config = loads(filled(defaults_text()), "defaults.toml")
    assert config.server.spool_directory == "var/spool"
    assert config.queue.message_expiration_timeout == 2 * 86400.0
    rc, = config.receive_connectors
    assert rc.max_message_size == 36 * 1024**2 and rc.connection_timeout == 300.0
    assert rc.max_header_size == 256 * 1024 and rc.tarpit_interval == 5.0
    sc, = config.send_connectors
    assert sc.max_message_size == 35 * 1024**2 and sc.schedule.always
    assert config.directory.group_permissions == {"Exchange Servers": "ExchangeServers"}
    assert {entry.stage for entry in config.pipeline} >= set(builtins())
    assert not any(entry.enabled for entry in config.pipeline)   # pasting it changes nothing


def test_every_stage_with_every_option_default_and_the_pipeline_builds(tmp_path):
    """Each stage's table, enabled, is a pipeline check-config builds: the defaults are valid options."""
    text = defaults_text()
    tables = {t["stage"]: t for t in tomllib.loads(text)["pipeline"]}
    for name, factory in builtins().items():
        table = tables[name]
        for option, parse in factory.options.items():
            default = factory.defaults[option]
            if default is None:
                assert f"# {option} =  (not set)" in text
            else:
                assert parse(table[option]) == parse(default)
    assert "rspamd" in tables                 # the drop-in of plugins/, found as the server finds it
    path = tmp_path / "all-stages.toml"
    path.write_text(filled(text, **{"enabled = false": "enabled = true",
                                    "remote_triggered_delivery = false": "remote_triggered_delivery = true"}))
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def _factories():
    from exedge.pipeline.registry import discover
    return list(discover(os.path.join(ROOT, "plugins"))[0].values())


@pytest.mark.parametrize("factory", _factories(), ids=lambda f: f.name)
def test_stage_defaults_are_its_constructor_defaults(factory):
    """A declared default that drifts from what the stage does without the option fails here."""
    assert set(factory.defaults) == set(factory.options)
    classes = {
        "sender_filter": "exedge.pipeline.builtin:SenderFilter",
        "header_firewall": "exedge.pipeline.content:HeaderFirewall",
        "connection_filter": "exedge.pipeline.builtin:ConnectionFilter",
        "recipient_filter": "exedge.pipeline.builtin:RecipientFilter",
        "content_restrictions": "exedge.pipeline.content:ContentRestrictions",
        "attachment_filter": "exedge.pipeline.content:AttachmentFilter",
        "sender_id": "exedge.pipeline.sender_id:SenderId",
        "etrn": "exedge.dequeue.etrn:Etrn",
        "rspamd": f"{type(factory).__module__}:RspamdScan",      # the drop-in of plugins/
    }
    module, _, name = classes[factory.name].partition(":")
    stage = getattr(__import__(module, fromlist=[name]), name)
    parameters = inspect.signature(stage.__init__).parameters
    for option, default in factory.defaults.items():
        if option not in parameters:          # used by build() itself (recipient_lookup, lookup_cache)
            continue
        expected = parameters[option].default
        assert (None if default is None else factory.options[option](default)) == expected, option


CHANGED = textwrap.dedent('''\
    [server]
    fqdn = "edge01.example.com"
    spool_directory = "var/spool"          # the default, written out: not shown

    [queue]
    message_retry_interval = "00:15:00"    # 900 s, Exchange's spelling of the default: not shown
    message_expiration_timeout = "3d"

    [[accepted_domains]]
    domain_name = "example.com"

    [[receive_connectors]]
    name = "From Internet"
    usage = "Internet"
    bindings = ["127.0.0.1:2525"]
    remote_ip_ranges = ["0.0.0.0-255.255.255.255"]   # Internet's default: not shown
    max_message_size = 37748736                        # 36MB: not shown
    max_recipients_per_message = 500
    permission_groups = ["AnonymousUsers"]             # Internet's default: not shown

    [[send_connectors]]
    name = "Local drop"
    address_spaces = ["example.com"]
    drop_directory = "var/drop"
    max_message_size = "35 MB"                         # not shown

    [[pipeline]]
    stage = "sender_filter"
    action = "Reject"                                  # not shown
    blocked_senders = ["spam@example.net"]
    ''')


@pytest.mark.parametrize("command", [("check-config", "-n"), ("show-config", "-n")])
def test_non_default_view(tmp_path, command):
    path = tmp_path / "changed.toml"
    path.write_text(CHANGED)
    result = run(*command, str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        'accepted_domains["example.com"].domain_name = "example.com"',
        'pipeline["sender_filter"].blocked_senders = ["spam@example.net"]',
        'pipeline["sender_filter"].stage = "sender_filter"',
        'queue.message_expiration_timeout = "3d"',
        'receive_connectors["From Internet"].bindings = ["127.0.0.1:2525"]',
        'receive_connectors["From Internet"].max_recipients_per_message = 500',
        'receive_connectors["From Internet"].name = "From Internet"',
        'receive_connectors["From Internet"].usage = "Internet"',
        'send_connectors["Local drop"].address_spaces = ["example.com"]',
        'send_connectors["Local drop"].drop_directory = "var/drop"',
        'send_connectors["Local drop"].name = "Local drop"',
        'server.fqdn = "edge01.example.com"',
    ]
    for line in result.stdout.splitlines():     # each value is a TOML value
        tomllib.loads("v = " + line.split(" = ", 1)[1])


def test_non_default_view_names_entries_safely_and_by_index_when_names_repeat(tmp_path):
    path = tmp_path / "odd.toml"
    path.write_text(textwrap.dedent('''\
        [[accepted_domains]]
        domain_name = "example.com"
        name = "Ex\\u001b[31mample"

        [[send_connectors]]
        name = "Drop\\u001b[31m"
        address_spaces = ["example.com"]
        drop_directory = "var/drop"

        [[pipeline]]
        stage = "sender_filter"
        block_blank_senders = true

        [[pipeline]]
        stage = "sender_filter"
        priority = 5
        '''))
    result = run("show-config", "-n", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "\x1b" not in result.stdout            # a control character stays escaped
    assert 'accepted_domains["example.com"].name = "Ex\\u001b[31mample"' in result.stdout
    assert 'send_connectors["Drop\\u001b[31m"].drop_directory = "var/drop"' in result.stdout
    assert "pipeline[0].block_blank_senders = true" in result.stdout
    assert "pipeline[1].priority = 5" in result.stdout


def test_non_default_view_of_a_bad_file_lists_its_problems(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[queue]\nmessage_retry_interval = "soon"\n')
    result = run("show-config", "-n", str(path))
    assert result.returncode == 1
    assert f"{path}:2: queue.message_retry_interval" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_non_default_view_needs_a_file():
    result = run("show-config", "-n")
    assert result.returncode == 2
    assert "needs a FILE" in result.stderr


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"exedge \d+\.\d+\S* \(Twisted \S+, Python 3\.\d+\.\d+\S*\)\n", result.stdout), result.stdout
