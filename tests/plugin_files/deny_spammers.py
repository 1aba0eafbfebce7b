"""A drop-in stage the tests copy into a server's plugins/ directory: the README's example."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from exedge.pipeline import IStageFactory, Stage, reject


class DenySpammers(Stage):
    name = "deny_spammers"

    def __init__(self, words):
        self.words = words

    def on_mail(self, session, sender):
        if any(word in sender for word in self.words):
            return reject(f"Sender {sender} is not welcome here", "5.7.1", 550)


@implementer(IPlugin, IStageFactory)
class Factory:
    name, anti_spam, hooks = "deny_spammers", False, ("on_mail",)
    options = {"words": lambda value: tuple(value)}

    def build(self, options):
        return DenySpammers(options.get("words", ("spam",)))


factory = Factory()
