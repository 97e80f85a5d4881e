from .sources import *  # noqa: F401,F403  (intermediate step of the split into a package: the next commit splits it)
from .sources import _local_builder  # noqa: F401
