"""Exceptions of idtl-ray.

Every error a user can cause derives from :class:`IdtlError`; its message is one line that names the
problem and the fix, so the CLI prints it as is (no traceback).
"""

from __future__ import annotations


class IdtlError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class InputError(IdtlError, ValueError):
    """Bad arguments or data given to the influence engine (empty set, label out of range, ...)."""


class DataError(IdtlError, ValueError):
    """A dataset cannot be found, read or validated."""


class WeightsError(IdtlError, ValueError):
    """Model weights cannot be found, read or fitted to the model."""


class SolverDivergedError(IdtlError, ArithmeticError):
    """An inverse-curvature solver diverged or produced non-finite values."""


class MaskError(IdtlError, ValueError):
    """A mask file is missing, corrupt, or belongs to another dataset or split."""
