"""The build's stages, each a function of a ``WorldBuilder`` and the keys of the stages before it.

Each returns its key (its parameters, which its cache marker holds): the stages after it record
its digest, so a changed parameter redoes exactly the stages downstream of it.
"""
