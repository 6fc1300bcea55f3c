"""relora-trainer: the ReLoRA method, the trainer Job runtime and the local `relora` CLI.

Modules that need torch import it themselves; the CLI front end does not, so that
`relora validate` and `relora crd` work in the operator image too.
"""
