"""The AdapterMigration API (relora.dev/v1alpha1) as pydantic models: the single source of truth."""
