"""The lab: worlds to migrate adapters in (the toy world, the corpus testbed) and the benchmark.

Built on the product (``relora_trainer``, ``relora_api``), never imported by it.
"""
