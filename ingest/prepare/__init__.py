"""The prepare stage (``qsnet prepare``): raw exam stores -> training-ready prepared stores.

See :mod:`ingest.prepare.service` for the stage, :mod:`.register` (elastix), :mod:`.grid`
(resampling, scaling and their inverses) and :mod:`.brainmask`.
"""

from ingest.prepare.grid import to_native
from ingest.prepare.service import PREPARE_VERSION, PrepareError, prepare

__all__ = ["PREPARE_VERSION", "PrepareError", "prepare", "to_native"]
