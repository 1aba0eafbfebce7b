"""
Which stages exist and which run: built-ins, drop-in plugins, and the
[[pipeline]] entries that configure them.

Drop-ins are modules in the plugin directory ([server] plugin_directory,
"plugins" by default), found with C{twisted.plugin.getPlugins}. The
directory is loaded as a package of its own (research §5: getPlugins needs
a regular package; its dropin.cache is written there). Each module is
imported first on its own, so a broken plugin is reported with its file
and error instead of Twisted's bare "Unhandled Error".
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys

import attrs
from twisted.plugin import getPlugins

from exedge.config import ConfigError

from . import builtin, content, sender_id_factory
from .runner import Entry, Pipeline
from .stage import IStageFactory, hooks_of

# every built-in stage, by name
def builtins() -> dict:
    """The stages exedge ships, by name."""
    # the dequeue room's ETRN stage imports the stage interface from this
    # package: imported when asked for, not when this module is
    from exedge.dequeue.etrn import EtrnFactory
    return {f.name: f for f in (*builtin.BUILTIN.values(), sender_id_factory.SenderIdFactory(), *content.FACTORIES,
                                EtrnFactory())}

PACKAGE = "exedge_dropins"


def _package(directory: str):
    """The plugin directory imported as the package C{exedge_dropins} (it needs an __init__.py)."""
    directory = os.path.abspath(directory)
    module = sys.modules.get(PACKAGE)
    if module is not None and list(getattr(module, "__path__", [])) == [directory]:
        return module
    for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(directory, "__init__.py"),
                                                  submodule_search_locations=[directory])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module


def discover(directory: str) -> tuple[dict, list[tuple[str, str]], dict]:
    """
    (name -> factory, [(file, error)] of broken plugins, name -> where it came from).
    Built-ins come first; a drop-in cannot take a built-in's name.
    """
    factories = builtins()
    origins = {name: "built-in" for name in factories}
    broken: list[tuple[str, str]] = []
    if not os.path.isdir(directory):
        return factories, broken, origins
    if not os.path.exists(os.path.join(directory, "__init__.py")):
        broken.append((directory, "not a package: add an empty __init__.py (twisted.plugin needs one)"))
        return factories, broken, origins
    try:
        package = _package(directory)
    except Exception as e:
        broken.append((os.path.join(directory, "__init__.py"), f"{e.__class__.__name__}: {e}"))
        return factories, broken, origins
    for filename in sorted(os.listdir(directory)):
        if not filename.endswith(".py") or filename.startswith("_"):
            continue
        try:
            importlib.import_module(f"{PACKAGE}.{filename[:-3]}")
        except Exception as e:
            broken.append((os.path.join(directory, filename), f"{e.__class__.__name__}: {e}"))
    for factory in getPlugins(IStageFactory, package):
        where = getattr(sys.modules.get(type(factory).__module__), "__file__", None) or directory
        if factory.name in factories:
            broken.append((where, f"stage name {factory.name!r} is already taken ({origins[factory.name]})"))
            continue
        factories[factory.name] = factory
        origins[factory.name] = where
    return factories, broken, origins


@attrs.frozen
class StageContext:
    """
    What a stage may use of the server: its clock, its DNS resolver, the
    configuration, and the door to the queue for remote triggers
    (L{exedge.interfaces.IRemoteTriggers}: ETRN).
    """

    clock: object
    resolver: object
    config: object
    dequeue: object = None


def _build(factory, options, context):
    """factory.build(options, context), or build(options) for factories that take no context."""
    try:
        params = inspect.signature(factory.build).parameters
    except (TypeError, ValueError):
        params = {}
    return factory.build(options, context) if len(params) >= 2 else factory.build(options)


def build_pipeline(config, clock, resolver=None, dequeue=None, metrics=None) -> Pipeline:
    """The configured pipeline; ConfigError naming the entry and key for every problem."""
    factories, broken, origins = discover(config.server.plugin_directory)
    problems = [config.problem(("server", "plugin_directory"), f"broken plugin {path}: {error}")
                for path, error in broken]
    connectors = {c.name for c in config.receive_connectors}
    entries = []
    for i, item in enumerate(config.pipeline):
        if item is None or not item.enabled:
            continue
        factory = factories.get(item.stage)
        if factory is None:
            problems.append(config.problem(("pipeline", i, "stage"),
                                           f"no stage {item.stage!r} (known: {', '.join(sorted(factories))})"))
            continue
        for name in item.receive_connectors:
            if name not in connectors:
                problems.append(config.problem(("pipeline", i, "receive_connectors"),
                                               f"no receive connector {name!r}"))
        options = {}
        for key, value in item.options.items():
            parse = factory.options.get(key)
            if parse is None:
                problems.append(config.problem(
                    ("pipeline", i, key), f"stage {item.stage} has no option {key!r} "
                                          f"(its options: {', '.join(sorted(factory.options)) or 'none'})"))
                continue
            try:
                options[key] = parse(value)
            except ValueError as e:
                problems.append(config.problem(("pipeline", i, key), f"stage {item.stage}: {e}"))
        if problems:
            continue
        try:
            stage = _build(factory, options, StageContext(clock, resolver, config, dequeue))
        except ValueError as e:
            problems.append(config.problem(("pipeline", i), f"stage {item.stage}: {e}"))
            continue
        entries.append(Entry(stage, item.priority, frozenset(item.receive_connectors) or None, item.timeout))
    if problems:
        raise ConfigError(problems)
    return Pipeline(entries, clock, metrics=metrics)


def describe(config) -> list[str]:
    """Every stage found, where it came from and its hooks (for check-config)."""
    factories, broken, origins = discover(config.server.plugin_directory)
    lines = []
    for name in sorted(factories):
        f = factories[name]
        hooks = getattr(f, "hooks", None)
        if hooks is None:
            try:
                hooks = hooks_of(_build(f, {}, StageContext(None, None, config)))
            except Exception:
                hooks = ["?"]
        kind = (" (anti-spam)" if f.anti_spam else "") + (" (reads the body)" if getattr(f, "needs_body", False) else "")
        lines.append(f"stage {name}{kind}: {origins[name]}; hooks: {', '.join(hooks)}")
    lines += [f"broken plugin {path}: {error}" for path, error in broken]
    return lines
