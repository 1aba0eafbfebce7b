"""
A drop-in stage on the TLS and AUTH hooks: mail is taken only after a
STARTTLS handshake, and some users may not log on through this server.
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from exedge.pipeline import IStageFactory, Stage, reject


class SessionPolicy(Stage):
    name = "session_policy"

    def __init__(self, barred):
        self.barred = barred

    def on_starttls(self, session):
        session.notes["handshakes"] = session.notes.get("handshakes", 0) + 1

    def on_auth(self, session, user):
        if user in self.barred:
            return reject(f"{user} may not log on here", "5.7.8", 535)

    def on_mail(self, session, sender):
        if not session.notes.get("handshakes"):
            return reject("Use STARTTLS first", "5.7.10", 530)


@implementer(IPlugin, IStageFactory)
class Factory:
    name, anti_spam, hooks = "session_policy", False, ("on_starttls", "on_auth", "on_mail")
    options = {"barred": lambda value: tuple(value)}

    def build(self, options):
        return SessionPolicy(options.get("barred", ()))


factory = Factory()
