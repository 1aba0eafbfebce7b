"""
The PowerShell-line parser (exedge/admin/ps.py) and the binding of its
parameters to a cmdlet (exedge/admin/cmdlets.py), in process.
"""

import pytest

from exedge.admin import ps
from exedge.admin.cmdlets import CmdletError, Param, Registry, Session, bind, cmdlet
from exedge.admin.ps import Parameter, ParseError, Variable, Word, parse_line, parse_tokens, tokens_from_argv


def test_seed_line_with_quotes_switch_and_lists():
    line = parse_line('New-SendConnector -Name "Smart host to Internet" -AddressSpaces * -Custom '
                      '-DNSRoutingEnabled $false -SmartHosts 192.168.3.2,mbx.contoso.com')
    assert line.command.name == "New-SendConnector"
    assert line.command.elements == (
        Parameter("Name"), Word("Smart host to Internet", True), Parameter("AddressSpaces"), Word("*"),
        Parameter("Custom"), Parameter("DNSRoutingEnabled"), False,
        Parameter("SmartHosts"), (Word("192.168.3.2"), Word("mbx.contoso.com")),
    )
    assert line.command.elements[1].quoted and not line.command.elements[3].quoted
    assert line.assign is None and line.format is None


def test_assignment_variables_and_constants():
    line = parse_line("$MailboxCredentials = Get-Credential")
    assert line.assign == "MailboxCredentials" and line.command.name == "Get-Credential"
    line = parse_line("Set-X -A $cred -B $TRUE -C $null -D:$false")
    assert line.command.elements == (Parameter("A"), Variable("cred"), Parameter("B"), True,
                                     Parameter("C"), None, Parameter("D", False, True))


def test_single_quotes_are_literal_and_doubled_quotes_escape():
    line = parse_line("Set-X 'it''s $not a variable' \"say \"\"hi\"\"\" ab'c d'e")
    assert [str(e) for e in line.command.elements] == ["it's $not a variable", 'say "hi"', "abc de"]


def test_comma_lists_with_spaces_and_quoted_items():
    line = parse_line('Set-X -L a, "b c" ,d')
    assert line.command.elements[1] == (Word("a"), Word("b c", True), Word("d"))


def test_pipe_to_format_list_and_table():
    line = parse_line("Get-SendConnector | Format-List Name,Usage,AddressSpaces")
    assert line.format == ps.Format("List", ("Name", "Usage", "AddressSpaces"))
    assert parse_line("Get-SendConnector | ft").format == ps.Format("Table", ())
    assert parse_line("Get-SendConnector | fl -Property Name, Fqdn").format == ps.Format("List", ("Name", "Fqdn"))


def test_blank_and_comment_lines():
    assert parse_line("") is None
    assert parse_line("   # a comment") is None
    assert parse_line("Get-SendConnector # trailing").command.elements == ()


def test_typographic_dashes_and_quotes_from_documents():
    line = parse_line("New-SendConnector \u2013Name \u201cTo Internet\u201d")
    assert line.command.elements == (Parameter("Name"), Word("To Internet", True))


def test_identity_with_backslash_is_plain_text():
    line = parse_line(r'Get-ReceiveConnector "EDGE01\From Internet"')
    assert str(line.command.elements[0]) == "EDGE01\\From Internet"


@pytest.mark.parametrize("text, expected", [
    ('Set-X -Name "unbalanced', "unbalanced double quote"),
    ("Set-X -Name 'unbalanced", "unbalanced single quote"),
    ("Set-X -Name $(Remove-Item x)", "subexpressions are not supported"),
    ('Set-X -Name "a$(whoami)"', "'$' inside double quotes"),
    ('Set-X -Name "$env:HOME"', "'$' inside double quotes"),
    ("Set-X -Name a`nb", "backtick"),
    ("Get-X; Remove-SendConnector y", "one command per line"),
    ("Get-X & calc", "'&'"),
    ("Get-X > out.txt", "redirection"),
    ("New-SendConnector -Name <Name>", "placeholder"),
    ("Set-X -Name {script}", "script blocks"),
    ("Set-X @args", "splatting"),
    ("Set-X -A $cred.Password", "member access"),
    ("Get-X | Remove-Item", "only Format-List"),
    ("Get-X | fl | ft", "only one pipe"),
    ("'Get-X'", "expected a cmdlet name"),
    ("Get-X -A 1,", "comma must be followed"),
    ("$true = Get-Credential", "constant"),
    ("Get-X -A a=b", "'=' inside a value"),
    ("Get-X -Name a\x00b", "control character"),
    ("Get-X -Name a\x1b[2Jb", "control character"),
])
def test_hostile_and_unsupported_lines_are_refused(text, expected):
    with pytest.raises(ParseError) as e:
        parse_line(text)
    assert expected in str(e.value)


def test_argv_tokens_are_pre_split_values():
    line = parse_tokens(tokens_from_argv(
        ["New-SendConnector", "-Name", "To Internet", "-AddressSpaces", "*", "-DNSRoutingEnabled", "$true",
         "-SmartHosts", "a,b", "-Enabled:$false", "|", "fl", "Name"]))
    assert line.command.elements == (
        Parameter("Name"), Word("To Internet"), Parameter("AddressSpaces"), Word("*"),
        Parameter("DNSRoutingEnabled"), True, Parameter("SmartHosts"), (Word("a"), Word("b")),
        Parameter("Enabled", False, True))
    assert line.format == ps.Format("List", ("Name",))
    # what the shell hands over is never evaluated: a $(...) is text, a $var is refused
    assert parse_tokens(tokens_from_argv(["Set-X", "a;b$(c)"])).command.elements == (Word("a;b$(c)"),)
    with pytest.raises(ParseError, match="use exedge ps"):
        tokens_from_argv(["Set-X", "-A", "$cred"])


# -- binding ------------------------------------------------------------------------

@pytest.fixture
def registry():
    reg = Registry()

    @cmdlet("Set-Thing", Param("Identity", position=0, mandatory=True), Param("Name"),
            Param("AddressSpaces"), Param("AuthMechanism"), Param("AuthTarpitInterval"),
            Param("Custom", switch=True), Param("Port", parse=int), registry=reg)
    def set_thing(ctx, args):
        return args

    return reg


def _bind(registry, text, session=None):
    line = parse_line(text)
    return bind(registry.get(line.command.name), line.command, session or Session())


def test_binding_positional_prefix_and_case(registry):
    args = _bind(registry, 'set-thing "Old" -name New -ADDRESS a,b -Cust -AuthM Tls -Port 25')
    assert args == {"Identity": "Old", "Name": "New", "AddressSpaces": ("a", "b"), "Custom": True,
                    "AuthMechanism": "Tls", "Port": 25}


def test_unknown_parameter_names_it_and_lists_the_valid_ones(registry):
    with pytest.raises(CmdletError) as e:
        _bind(registry, "Set-Thing x -Bogus 1")
    assert "unknown parameter -Bogus" in str(e.value)
    assert "-Identity, -Name, -AddressSpaces" in str(e.value)


def test_ambiguous_prefix_lists_the_candidates(registry):
    with pytest.raises(CmdletError, match="-Auth is ambiguous: -AuthMechanism, -AuthTarpitInterval"):
        _bind(registry, "Set-Thing x -Auth Tls")


def test_binding_errors(registry):
    for text, expected in [
        ("Set-Thing -Name a", "missing mandatory parameter(s) -Identity"),
        ("Set-Thing x y", "unexpected value 'y'"),
        ("Set-Thing x -Name", "-Name needs a value"),
        ("Set-Thing x -Name a -Name b", "-Name is given twice"),
        ("Set-Thing x -Name $nothing", "variable $nothing is not set"),
        ("Set-Thing x -Custom:yes", "-Custom is a switch"),
        ("Set-Thing x -Port many", "-Port: invalid literal"),
    ]:
        with pytest.raises(CmdletError) as e:
            _bind(registry, text)
        assert expected in str(e.value), text


def test_variables_come_from_the_session(registry):
    session = Session()
    session.set("Cred", object())
    args = _bind(registry, "Set-Thing x -Name $cred", session)
    assert args["Name"] is session.get("CRED")


def test_unknown_cmdlet_lists_the_known_ones(registry):
    with pytest.raises(CmdletError, match="unknown cmdlet 'Get-Nothing'; known cmdlets: Set-Thing"):
        registry.get("Get-Nothing")


def test_values_from_the_network_cannot_drive_the_terminal():
    from exedge.admin.format import format_table, show
    assert show("421 4.4.2 \x1b[2Jgone\r\n") == "421 4.4.2 \\x1b[2Jgone\\x0d\\x0a"
    assert show("plain text") == "plain text"
    assert "\x1b" not in format_table([{"LastError": "\x1b]0;owned\x07"}], ["LastError"])
