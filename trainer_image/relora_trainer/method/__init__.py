"""The method, pure: fusion of the old update with the base evolution, the Bayesian search of
its coefficients, the scheduled regularizer, fine-tuning to readiness, quality measurement, and
one module per strategy behind one interface (strategies). Configured by plain dataclasses
(config); no pydantic, no storage, no manifests: relora_trainer.migrate does the I/O around it.
"""
