"""samopt: Sharpness-Aware Minimization for NumPy training loops.

SAM (Foret et al., ICLR 2021), adaptive SAM and GSAM over SGD, Adam, AdamW, Adagrad, RMSprop,
NAdam, AdaMax, RAdam, AdaBelief, Lion, Prodigy, Schedule-Free AdamW or any optimizer that
follows the ``Optimizer`` protocol, with parameter groups, tensorlogic-train's learning-rate
schedulers and gradient accumulation; the element-wise work is in Rust.
"""

from ._accumulate import GradAccumulator
from ._config import GradClipMode, LionConfig, OptimizerConfig, ScheduleFreeConfig
from ._errors import NonFiniteGradientError, OptimizerError, OutOfMemoryError, TrainError
from ._family import (
    BsamOptimizer,
    EsamOptimizer,
    FisherSamOptimizer,
    FriendlySamOptimizer,
    LookSamOptimizer,
    RandomizedSam,
    WsamOptimizer,
)
from ._flat import FlatParams, flat_params
from ._layerwise import (
    AdamPOptimizer,
    LambOptimizer,
    LarsOptimizer,
    SophiaConfig,
    SophiaOptimizer,
    SophiaVariant,
)
from ._lookahead import LookaheadOptimizer
from ._optimizers import (
    AdaBeliefOptimizer,
    AdagradOptimizer,
    AdaMaxOptimizer,
    AdamOptimizer,
    AdamWOptimizer,
    LionOptimizer,
    NAdamOptimizer,
    RAdamOptimizer,
    RMSpropOptimizer,
    ScheduleFreeAdamW,
    SgdOptimizer,
    compute_gradient_norm,
)
from ._prodigy import ProdigyConfig, ProdigyOptimizer
from ._protocol import Optimizer
from ._sam import GradFn, GsamOptimizer, SamOptimizer
from ._schedulers import (
    CosineAnnealingLrScheduler,
    CyclicLrMode,
    CyclicLrScheduler,
    ExponentialLrScheduler,
    LrScheduler,
    MultiStepLrScheduler,
    NoamScheduler,
    OneCycleLrScheduler,
    PlateauMode,
    PolynomialDecayLrScheduler,
    ReduceLROnPlateauScheduler,
    SgdrScheduler,
    StepLrScheduler,
    WarmupCosineLrScheduler,
    WarmupScheduler,
)

__all__ = [
    "AdaBeliefOptimizer",
    "AdaMaxOptimizer",
    "AdagradOptimizer",
    "AdamOptimizer",
    "AdamPOptimizer",
    "AdamWOptimizer",
    "BsamOptimizer",
    "CosineAnnealingLrScheduler",
    "CyclicLrMode",
    "CyclicLrScheduler",
    "EsamOptimizer",
    "ExponentialLrScheduler",
    "FisherSamOptimizer",
    "FlatParams",
    "FriendlySamOptimizer",
    "GradAccumulator",
    "GradClipMode",
    "GradFn",
    "GsamOptimizer",
    "LambOptimizer",
    "LarsOptimizer",
    "LionConfig",
    "LionOptimizer",
    "LookSamOptimizer",
    "LookaheadOptimizer",
    "LrScheduler",
    "MultiStepLrScheduler",
    "NAdamOptimizer",
    "NoamScheduler",
    "NonFiniteGradientError",
    "OneCycleLrScheduler",
    "Optimizer",
    "OptimizerConfig",
    "OptimizerError",
    "OutOfMemoryError",
    "PlateauMode",
    "PolynomialDecayLrScheduler",
    "ProdigyConfig",
    "ProdigyOptimizer",
    "RAdamOptimizer",
    "RMSpropOptimizer",
    "RandomizedSam",
    "ReduceLROnPlateauScheduler",
    "SamOptimizer",
    "ScheduleFreeAdamW",
    "ScheduleFreeConfig",
    "SgdOptimizer",
    "SgdrScheduler",
    "SophiaConfig",
    "SophiaOptimizer",
    "SophiaVariant",
    "StepLrScheduler",
    "TrainError",
    "WarmupCosineLrScheduler",
    "WarmupScheduler",
    "WsamOptimizer",
    "compute_gradient_norm",
    "flat_params",
]

__version__ = "0.1.0"
