"""The `twistd exedge` service maker; everything else lives in exedge.tap."""

from twisted.application.service import ServiceMaker

exedge = ServiceMaker(
    "exedge",
    "exedge.tap",
    "SMTP edge transport server with Exchange-style connectors",
    "exedge",
)
