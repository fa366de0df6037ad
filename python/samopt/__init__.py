"""samopt: Sharpness-Aware Minimization for NumPy training loops.

SAM (Foret et al., ICLR 2021), adaptive SAM and GSAM over SGD, Adam, AdamW or any optimizer
that follows the ``Optimizer`` protocol, with the element-wise work in Rust.
"""

from ._accumulate import GradAccumulator
from ._config import GradClipMode, OptimizerConfig
from ._errors import NonFiniteGradientError, OptimizerError, OutOfMemoryError, TrainError
from ._optimizers import AdamOptimizer, AdamWOptimizer, SgdOptimizer, compute_gradient_norm
from ._protocol import Optimizer
from ._sam import GradFn, GsamOptimizer, SamOptimizer

__all__ = [
    "AdamOptimizer",
    "AdamWOptimizer",
    "GradAccumulator",
    "GradClipMode",
    "GradFn",
    "GsamOptimizer",
    "NonFiniteGradientError",
    "Optimizer",
    "OptimizerConfig",
    "OptimizerError",
    "OutOfMemoryError",
    "SamOptimizer",
    "SgdOptimizer",
    "TrainError",
    "compute_gradient_norm",
]

__version__ = "0.1.0"
