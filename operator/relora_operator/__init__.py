"""relora-operator: the AdapterMigration API, its CRD, and (later) the Kopf operator.

This package must import without torch: the operator image has no ML stack.
"""

__version__ = "0.1.0"
