"""The AdapterMigration API (relora.dev/v1alpha1), shared by the operator, the trainer and the CLI.

The pydantic models (the single source of truth: the CRD schema is rendered from them), the URI
rules, the trainer contract, manifest loading and validation. No torch and no Kopf: the operator
image, the trainer image and `relora validate` all import it.
"""

__version__ = "0.1.0"
