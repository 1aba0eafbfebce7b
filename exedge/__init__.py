"""exedge: an SMTP edge transport server on Twisted."""

__version__ = "0.1.0"
