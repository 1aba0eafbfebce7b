"""
The admins' language: PowerShell lines (C{ps.py}) bound to registered
cmdlets (C{cmdlets.py}: the registry, C{Param}, C{Context}), rendered as
Exchange renders them (C{format.py}), run by C{exedge ps} and
C{exedge <Cmdlet-Name>} (C{shell.py}). The configuration cmdlets
(C{config_cmdlets.py}) edit the TOML file through C{edit.py}, which writes
only what C{validate.py} (the check C{exedge check-config} makes) accepts.
"""
