"""
The pipeline room: every SMTP event passes through ordered stages, built-in
(Exchange's Edge agents) or dropped into the plugin directory.
"""

from .registry import build_pipeline, describe, discover
from .runner import Entry, Pipeline
from .session import Session
from .message import Message
from .stage import ACCEPT, CONTINUE, IStage, IStageFactory, Stage, Verdict, defer_, disconnect, ok, reject, turn

__all__ = [
    "ACCEPT", "CONTINUE", "Entry", "IStage", "IStageFactory", "Message", "Pipeline", "Session", "Stage",
    "Verdict", "build_pipeline", "defer_", "describe", "discover", "disconnect", "ok", "reject", "turn",
]
