"""
The queue viewer page (viewer.html beside this module): one HTML document
with its style and script inline, served by the management endpoint at
C{GET /} and talking to the same endpoint's JSON API with the bearer token.

It is package data read through importlib.resources, so it is found in an
installed wheel, an editable install and a source checkout alike; it is
read once per process, as it cannot change while the server runs.

The page's own Content-Security-Policy (a meta element) allows its one
inline script by hash and nothing else, so that no inline event handler
could ever run in it. The hash is computed here from the script as shipped,
rather than written into the file by hand, so an edit of the script cannot
leave a stale hash that blocks the page.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

PLACEHOLDER = b"@SCRIPT_HASH@"


def script_hash(page: bytes) -> bytes:
    """The CSP source ('sha256-...') of the page's one inline script."""
    opened = page.index(b"<script>") + len(b"<script>")
    script = page[opened:page.index(b"</script>", opened)]
    return b"sha256-" + base64.b64encode(hashlib.sha256(script).digest())


@functools.cache
def viewer_page() -> bytes:
    page = resources.files(__package__).joinpath("viewer.html").read_bytes()
    if page.count(b"<script") != 1 or page.count(PLACEHOLDER) != 1:
        raise RuntimeError("viewer.html must hold one inline script and one @SCRIPT_HASH@ placeholder")
    return page.replace(PLACEHOLDER, script_hash(page))
