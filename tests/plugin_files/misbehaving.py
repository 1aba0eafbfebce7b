"""Stages that fail: one raises in RCPT, one never answers MAIL."""

from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from exedge.pipeline import IStageFactory, Stage

class Raises(Stage):
    name = "raises"

    def on_rcpt(self, session, recipient):
        if recipient.startswith("boom@"):
            raise RuntimeError("this plugin has a bug")

class Hangs(Stage):
    name = "hangs"

    async def on_mail(self, session, sender):
        if sender.startswith("slow@"):
            await defer.Deferred()          # never fires

@implementer(IPlugin, IStageFactory)
class RaisesFactory:
    name, anti_spam, options = "raises", False, {}

    def build(self, options):
        return Raises()

@implementer(IPlugin, IStageFactory)
class HangsFactory:
    name, anti_spam, options = "hangs", False, {}

    def build(self, options):
        return Hangs()

raises = RaisesFactory()
hangs = HangsFactory()
