"""BatchNorm folding and no-op removal."""

from kshrink.core.batchnorm import fold, plan_folds
from kshrink.fold.technique import Fold

__all__ = ["Fold", "fold", "plan_folds"]
