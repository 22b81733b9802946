"""Plain, readable Python optimizers: the ground truth of the parity tests."""

from dldna_fused.reference.adafactor import Adafactor
from dldna_fused.reference.adagrad import AdaGrad
from dldna_fused.reference.adam import Adam, AdamW
from dldna_fused.reference.base import BaseOptimizer
from dldna_fused.reference.lion import Lion
from dldna_fused.reference.lowbit import Adam8bit, AdamW4bit, AdamW8bit, Lion8bit
from dldna_fused.reference.rmsprop import RMSProp
from dldna_fused.reference.sgd import SGD
from dldna_fused.reference.sophia import Sophia

__all__ = ["AdaGrad", "Adafactor", "Adam", "Adam8bit", "AdamW", "AdamW4bit", "AdamW8bit", "BaseOptimizer", "Lion",
           "Lion8bit", "RMSProp", "SGD", "Sophia"]
