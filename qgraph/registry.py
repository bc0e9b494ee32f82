"""Registered passes: qgraph's own, and those third-party packages declare.

A pass is registered as a ``qgraph.pipeline.PassInfo``: a name, the phase it runs in, a one-line
summary, a ``build`` function that makes the pass for a target and options (or returns None where
the pass does not apply), and optionally why it is there and the facts it requires and ensures.
qgraph's own passes are the table ``qgraph.passes.PIPELINE``; another package registers its own
through the ``qgraph.passes`` entry-point group, whose entries name a ``PassInfo`` or a sequence
of them::

    [project.entry-points."qgraph.passes"]
    my-fusion = "my_package.qgraph_plugin:MY_FUSION"

Within a phase, passes run in registration order: qgraph's first, then plugins by entry-point
name. The pipeline refuses a plugin's pass that would break ``qgraph.passes.ORDER`` or run before
a pass ensuring a fact it requires.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import operator
from collections.abc import Iterable
from importlib.metadata import entry_points

from qgraph import passes as builtin
from qgraph.errors import PipelineError
from qgraph.options import CompileOptions
from qgraph.pipeline import PassInfo, Pipeline
from qgraph.targets import TargetSpec, get_target

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "qgraph.passes"


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a pass's ``build`` function may read."""

    target: TargetSpec
    options: CompileOptions


def registered_passes() -> list[PassInfo]:
    """qgraph's passes followed by plugins' passes; a broken plugin is skipped with a warning."""
    passes = [_built_in(info) for info in builtin.PIPELINE]
    names = {info.name for info in passes}
    for info in _plugin_passes():
        if info.name in names:
            logger.warning(
                "plugin pass '%s' from %s clashes with an existing pass; skipped",
                info.name,
                info.origin,
            )
            continue
        names.add(info.name)
        passes.append(info)
    return passes


def _built_in(info: PassInfo) -> PassInfo:
    """``info`` with its ``build``, a module name under ``qgraph.passes``, replaced by the
    module's builder for it."""
    if not isinstance(info.build, str):
        return info
    module = importlib.import_module(f"{builtin.__name__}.{info.build}")
    return dataclasses.replace(info, build=module.BUILDERS[info.name])


def _plugin_passes() -> Iterable[PassInfo]:
    for entry_point in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        origin = entry_point.dist.name if entry_point.dist else entry_point.value
        try:
            loaded = entry_point.load()
        except Exception as error:  # a plugin's import error must not break qgraph
            logger.warning(
                "cannot load qgraph pass plugin '%s' (%s): %s",
                entry_point.name,
                entry_point.value,
                error,
            )
            continue
        infos = [loaded] if isinstance(loaded, PassInfo) else loaded
        if not isinstance(infos, (list, tuple)):
            infos = [infos]
        for info in infos:
            if not isinstance(info, PassInfo):
                logger.warning(
                    "qgraph pass plugin '%s' gave %r, not a qgraph.PassInfo; skipped",
                    entry_point.name,
                    info,
                )
                continue
            yield dataclasses.replace(info, origin=origin)


def build_pipeline(
    target: TargetSpec | str = "auto", options: CompileOptions | None = None
) -> Pipeline:
    """The pipeline of registered passes for ``target``, without those ``options`` skips."""
    options = options or CompileOptions()
    available = registered_passes()
    unknown = options.skip_passes - {info.name for info in available}
    if unknown:
        raise PipelineError(
            f"cannot skip unknown pass(es): {', '.join(sorted(unknown))} (see `qgraph passes`)"
        )
    context = PassContext(get_target(target), options)
    problems = target_problems(context.target)
    if problems:
        raise PipelineError(f"target '{context.target.name}': {'; '.join(problems)}")
    pipeline = Pipeline(builtin.ORDER)
    for info in available:
        if info.name in options.skip_passes:
            continue
        pass_ = info.build(context)
        if pass_ is not None:
            pipeline.add(
                pass_, info.phase, name=info.name, requires=info.requires, ensures=info.ensures
            )
    return pipeline


TARGET_CAPABILITIES = {
    "lowering_rules": ("qgraph.passes.lowering", "RULE_NAMES", "lowering rule"),
    "kernels.quantizable_ops": ("qgraph.passes.annotate", "WEIGHT_LAYOUTS", "quantizable op"),
    "kernels.dynamic_quantizable_ops": (
        "qgraph.passes.annotate",
        "WEIGHT_LAYOUTS",
        "quantizable op",
    ),
}
"""Target fields naming what a built-in pass does: field -> (module, what it has, what to
call an entry). A record asking for more than the passes have would be silently ignored.
(What a record's fields say of each other is checked when it is made: ``targets.spec``.)"""


def target_problems(target: TargetSpec) -> list[str]:
    """What ``target``'s record asks of qgraph's passes that they cannot do, one line each
    (the pass modules are read here, as in ``registered_passes``: they import this one)."""
    problems = []
    for field, (module, name, entry) in TARGET_CAPABILITIES.items():
        known = getattr(importlib.import_module(module), name)
        for value in operator.attrgetter(field)(target):
            if value not in known:
                problems.append(
                    f"{field} names {entry} '{value}', which qgraph has none of "
                    f"(it has: {', '.join(sorted(known))})"
                )
    return problems
