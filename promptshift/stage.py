"""Stages that are both a subpackage and a call.

``promptshift.extract`` (likewise ``causal``, ``metrics``, ``report``) is the subpackage
that implements a stage, and ``ps.extract(sweep, store)`` runs that stage: calling the
subpackage's module object calls the function of the same name that the subpackage
defines (``promptshift.extract.extract``). A plain function of that name in
``promptshift/__init__.py`` would not survive: Python's import system binds
``promptshift.extract`` to the subpackage as soon as anything imports
``promptshift.extract.worker``. Giving a module a subclass of ``types.ModuleType`` as its
class is the documented way to customise a module (Python reference, "Customizing module
attribute access"); everything else about the module is unchanged.
"""

from __future__ import annotations

import inspect
import sys
import types


class StageModule(types.ModuleType):
    """A stage's subpackage that runs the stage when called (see the module docstring)."""

    def _stage(self):
        return getattr(self, self.__name__.rsplit(".", 1)[-1])

    def __call__(self, *args, **kwargs):
        return self._stage()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # what notebooks show for ps.extract(
        return inspect.signature(self._stage())


def callable_stage(module_name: str) -> None:
    """Make the subpackage ``module_name`` (being imported) callable as its stage function,
    the function of the subpackage's own name that it defines."""
    sys.modules[module_name].__class__ = StageModule
