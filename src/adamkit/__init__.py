"""adamkit: the Adam optimizer and its family, written once, exact against torch.optim, fast on CPU.

* :mod:`adamkit.rules` — each update rule as one element-wise function with the paper's math.
* :mod:`adamkit.numpy` — the family on NumPy arrays; :func:`minimize` and :func:`scipy_method` for SciPy users.
* :mod:`adamkit.torch` — drop-in ``torch.optim`` replacements (needs the ``torch`` extra).

``import adamkit`` needs neither torch nor a compiler: kernels compile on first use.
"""

from __future__ import annotations

from . import numpy, rules
from .minimize import minimize, scipy_method

__version__ = "0.1.0"
__all__ = ["numpy", "rules", "minimize", "scipy_method", "__version__"]
