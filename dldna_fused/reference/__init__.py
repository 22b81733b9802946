"""Plain, readable Python optimizers: the ground truth of the parity tests."""

from dldna_fused.reference.adafactor import Adafactor
from dldna_fused.reference.adagrad import AdaGrad
from dldna_fused.reference.adam import Adam, AdamW
from dldna_fused.reference.base import BaseOptimizer
from dldna_fused.reference.lion import Lion
from dldna_fused.reference.rmsprop import RMSProp
from dldna_fused.reference.sgd import SGD
from dldna_fused.reference.sophia import Sophia

__all__ = ["AdaGrad", "Adafactor", "Adam", "AdamW", "BaseOptimizer", "Lion", "RMSProp", "SGD", "Sophia"]
