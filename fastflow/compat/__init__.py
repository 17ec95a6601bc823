"""Drop-in replacements for the flow-matching libraries people already use.

    fastflow.compat.torchcfm        torchcfm.conditional_flow_matching
    fastflow.compat.flow_matching   flow_matching.path and flow_matching.solver
    fastflow.compat.diffusers       diffusers' FlowMatchEulerDiscreteScheduler and
                                    get_timestep_embedding

Switch one import; the tensor work runs on fastflow's fused kernels. The original libraries are
optional: the torchcfm and flow_matching drop-ins import their peer lazily, only where they
delegate to it; the diffusers one on import (its scheduler subclasses diffusers'). Each says
what to install when its peer is missing.
"""


def require(package, feature):
    """Import `package` for `feature`, or raise an ImportError that says what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"{feature} needs {package}: pip install 'fastflow[compat]' "
                          f"(or pip install {package})") from exc
