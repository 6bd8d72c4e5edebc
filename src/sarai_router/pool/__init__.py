"""The model pool (``ModelPool``): which models are resident, loading them lazily,
unloading them by policy, and the slots of each instance. The rules it keeps are in
``model_pool``."""

from ..errors import PoolError, QueueFull
from ..types import ResidentInfo
from .model_pool import ModelPool
from .resident import Resident

__all__ = ["ModelPool", "PoolError", "QueueFull", "Resident", "ResidentInfo"]
