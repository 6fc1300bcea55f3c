"""relora-sandbox: a Kubernetes API emulator and Job runner for tests and `relora sandbox`.

Real clients (kubectl, the kubernetes Python client, Kopf) talk to it over HTTP on 127.0.0.1.
It is not a cluster: one process, objects in memory, Jobs run as local subprocesses.
"""
