"""relora-operator: the Kopf operator that runs AdapterMigrations as batch/v1 Jobs.

Kopf wiring (handlers), the status planner, the Job builder, the Kubernetes client, metrics,
status seals and leader election. The API it serves lives in relora_api. This package must
import without torch: the operator image has no ML stack.
"""

from relora_api import __version__

__all__ = ["__version__"]
