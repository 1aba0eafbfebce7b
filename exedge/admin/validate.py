"""
Is this configuration one the server would start on? The one answer that
C{exedge check-config} prints and that the configuration cmdlets ask before
they write a file: the loader's problems, then what start-up reads besides
the file (certificates, password files, client CA stores, the pipeline's
stages and their options).
"""

from __future__ import annotations

from exedge import tls
from exedge.auth.secrets import load_secrets
from exedge.config import Config, load, loads


def check(config: Config) -> Config:
    """Raise ConfigError for what start-up would refuse beyond the file itself."""
    tls.receive_contexts(config)      # the certificates it names, as start-up checks them
    load_secrets(config)              # and the password files
    tls.client_ca_stores(config)
    tls.send_client_certificates(config)
    from exedge.pipeline import build_pipeline
    build_pipeline(config, None)
    return config


def validate(text: str, path: str) -> Config:
    """C{text} as the file at C{path} would be: the loaded L{Config}, or ConfigError listing every problem."""
    return check(loads(text, path))


def validate_file(path: str) -> Config:
    """The file at C{path} as it is on disk (unreadable or not UTF-8: a ConfigError too)."""
    return check(load(path))
