"""Drop-in for Meta's ``flow_matching`` 1.0.10 paths and ODE solver on fastflow's fused kernels.

Switch the prefix of the imports:

    # from flow_matching.path import AffineProbPath, CondOTProbPath
    # from flow_matching.path.scheduler import CosineScheduler
    # from flow_matching.solver import ODESolver
    from fastflow.compat.flow_matching.path import AffineProbPath, CondOTProbPath
    from fastflow.compat.flow_matching.path.scheduler import CosineScheduler  # or .scheduler
    from fastflow.compat.flow_matching.solver import ODESolver

``path.AffineProbPath.sample`` and its conversions are one fused pass each; ``scheduler`` holds
the schedulers and ScheduleTransformedModel; ``solver.ODESolver`` runs "euler", "midpoint",
"heun2" and "rk4" on ``fastflow.Sampler`` over torchdiffeq's grid. Same results as
flow_matching (see each module for where they are bit-equal). The rest (GeodesicProbPath,
MixtureDiscreteProbPath, adaptive ODE methods, ``enable_grad=True``, ``compute_likelihood``,
RiemannianODESolver, MixtureDiscreteEulerSolver) is flow_matching's own code, imported on first
use (``pip install flow_matching``; its licence is CC BY-NC, and none of its code is copied
here). fastflow's classes are registered with flow_matching's abstract bases as soon as both are
loaded, whichever first, so isinstance checks against ProbPath, Scheduler, ConvexScheduler,
Solver and ModelWrapper hold across the two. flow_matching's PathSample and SchedulerOutput are
plain dataclasses, with which nothing can be registered: a sample or scheduler output of either
library is an instance of fastflow's class, only flow_matching's are instances of its own.

The modules may also stand in for ``flow_matching.path``, ``flow_matching.path.scheduler`` and
``flow_matching.solver`` in ``sys.modules``; flow_matching's other submodules then still import
from the installed package, through an import hook that acts only below such a stand-in.
"""
import importlib
import importlib.machinery
import importlib.util
import os
import sys

from .. import require

PEER = "flow_matching"


def _ours(module):
    return getattr(module, "__name__", "").startswith("fastflow.")


# flow_matching's modules that define base classes fastflow's are registered with (`_link`).
_BASE_MODULES = frozenset({"flow_matching.path.path", "flow_matching.path.path_sample",
                           "flow_matching.path.scheduler.scheduler", "flow_matching.solver.solver",
                           "flow_matching.utils.model_wrapper"})


class _LinkingLoader:
    """A module loader that runs `_link` once the module is executed, and otherwise is the
    loader it wraps (source, code and file name for tracebacks and inspect)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _link(executed=module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _linking(spec):
    if spec is not None and spec.name in _BASE_MODULES and spec.loader is not None:
        spec.loader = _LinkingLoader(spec.loader)
    return spec


class _BaseModuleFinder:
    """Finds flow_matching's modules of base classes as the path finder would, with a loader
    that registers fastflow's classes with them as soon as they load, whichever package was
    imported first."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        if fullname not in _BASE_MODULES or not path:
            return None
        return _linking(importlib.machinery.PathFinder.find_spec(fullname, path, target))


class _PeerSubmoduleFinder:
    """Finds ``flow_matching.<a>.<b>`` in the installed flow_matching when ``flow_matching.<a>`` in
    sys.modules is one of fastflow's stand-ins (which have an empty ``__path__`` so that Python
    asks the finders at all). Inert otherwise: it never shadows the real package."""

    @staticmethod
    def find_spec(fullname, path=None, target=None):
        parent, _, _ = fullname.rpartition(".")
        if not fullname.startswith(PEER + ".") or not _ours(sys.modules.get(parent)):
            return None
        root = importlib.util.find_spec(PEER)
        if root is None or not root.submodule_search_locations:
            return None
        # The directory the original parent package lives in, e.g. .../flow_matching/solver.
        parts = parent.split(".")[1:]
        for base in root.submodule_search_locations:
            where = os.path.join(base, *parts)
            spec = importlib.machinery.PathFinder.find_spec(fullname, [where])
            if spec is not None:
                return _linking(spec)
        return None


if not any(isinstance(f, _PeerSubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.append(_PeerSubmoduleFinder())
if not any(isinstance(f, _BaseModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _BaseModuleFinder())


def delegating_getattr(module_name, names):
    """A module ``__getattr__`` that loads each of `names` ({name: flow_matching module defining
    it}) from flow_matching on first use."""
    def __getattr__(name):
        if name in names:
            return getattr(original(names[name], f"{module_name}.{name}"), name)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
    return __getattr__


def original(module, feature):
    """flow_matching's own ``module`` (e.g. "flow_matching.path.geodesic") for `feature`, with
    fastflow's base classes linked to flow_matching's; an ImportError that says what to install
    when flow_matching is missing."""
    require(PEER, feature)
    loaded = importlib.import_module(module)
    _link()
    return loaded


def _register(base, sub):
    """Make `sub` a virtual subclass of the ABC `base` (once; never creating a cycle)."""
    if not issubclass(sub, base) and not issubclass(base, sub):
        base.register(sub)


def _link(executed=None):
    """Register fastflow's classes with flow_matching's modules that are loaded (and genuine).
    `executed`: a module whose code has just run, though the import system has not yet
    marked it done."""
    def peer(name):
        module = sys.modules.get(name)
        # Still executing (imported by another base module that is loading): its own loader
        # links it when it is done.
        initializing = name != executed and getattr(getattr(module, "__spec__", None),
                                                    "_initializing", False)
        return None if module is None or _ours(module) or initializing else module

    scheduler = peer("flow_matching.path.scheduler.scheduler")
    if scheduler is not None:
        from . import scheduler as ours

        _register(scheduler.Scheduler, ours.Scheduler)
        _register(scheduler.ConvexScheduler, ours.ConvexScheduler)
        _register(ours.SchedulerOutput, scheduler.SchedulerOutput)
    model_wrapper = peer("flow_matching.utils.model_wrapper")
    if model_wrapper is not None:
        from . import scheduler as ours

        _register(model_wrapper.ModelWrapper, ours.ScheduleTransformedModel)
    prob_path = peer("flow_matching.path.path")
    if prob_path is not None:
        from . import path as ours

        _register(ours.ProbPath, prob_path.ProbPath)
        _register(prob_path.ProbPath, ours.AffineProbPath)
    path_sample = peer("flow_matching.path.path_sample")
    if path_sample is not None:
        from . import path as ours

        _register(ours.PathSample, path_sample.PathSample)
    solver = peer("flow_matching.solver.solver")
    if solver is not None:
        from . import solver as ours

        _register(ours.Solver, solver.Solver)
        _register(solver.Solver, ours.ODESolver)


_link()   # flow_matching may have been imported first
