"""
The queue viewer page (viewer.html beside this module): one HTML document
with its style and script inline, served by the management endpoint at
C{GET /} and talking to the same endpoint's JSON API with the bearer token.

It is package data read through importlib.resources, so it is found in an
installed wheel, an editable install and a source checkout alike; it is
read once per process, as it cannot change while the server runs.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def viewer_page() -> bytes:
    return resources.files(__package__).joinpath("viewer.html").read_bytes()
