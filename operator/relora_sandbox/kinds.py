"""Resource types the emulator serves: built-in kinds, and custom ones registered by CRDs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


@dataclass(frozen=True)
class Kind:
    """One served resource: where it lives in the API and how it behaves."""

    group: str  # "" for the core group
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    schema: dict[str, Any] | None = None  # openAPIV3Schema of custom resources
    printer_columns: tuple[dict[str, Any], ...] = ()
    log_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def key(self) -> tuple[str, str]:
        """(group, plural): identifies the stored objects across versions."""
        return (self.group, self.plural)

    def resource_entries(self) -> list[dict[str, Any]]:
        """APIResource entries for discovery (the resource and its subresources)."""
        entries: list[dict[str, Any]] = [
            {
                "name": self.plural,
                "singularName": self.singular,
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": [*VERBS, "deletecollection"],
                **({"shortNames": list(self.short_names)} if self.short_names else {}),
                **({"categories": list(self.categories)} if self.categories else {}),
            }
        ]
        if self.status_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if self.log_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/log",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": "Pod",
                    "verbs": ["get"],
                }
            )
        return entries


BUILTIN: list[Kind] = [
    Kind("", "v1", "Namespace", "namespaces", False, ("ns",), status_subresource=True),
    Kind("", "v1", "Pod", "pods", True, ("po",), ("all",), True, log_subresource=True),
    Kind("", "v1", "Event", "events", True, ("ev",)),
    Kind("", "v1", "ServiceAccount", "serviceaccounts", True, ("sa",)),
    Kind("", "v1", "Secret", "secrets", True),
    Kind("", "v1", "ConfigMap", "configmaps", True, ("cm",)),
    Kind("", "v1", "PersistentVolumeClaim", "persistentvolumeclaims", True, ("pvc",), (), True),
    Kind("", "v1", "Service", "services", True, ("svc",), ("all",), True),
    Kind("batch", "v1", "Job", "jobs", True, (), ("all",), True),
    Kind("events.k8s.io", "v1", "Event", "events", True, ("ev",)),
    Kind("coordination.k8s.io", "v1", "Lease", "leases", True),
    Kind("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    Kind("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    Kind("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    Kind("apps", "v1", "Deployment", "deployments", True, ("deploy",), ("all",), True),
    Kind(
        "apiextensions.k8s.io",
        "v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
        False,
        ("crd", "crds"),
        (),
        True,
    ),
]

GROUP_PRIORITY = {"": 100, "apps": 90, "batch": 80, "apiextensions.k8s.io": 70}


def from_crd(crd: dict[str, Any]) -> list[Kind]:
    """The kinds a CustomResourceDefinition serves (one per served version)."""
    spec = crd["spec"]
    names = spec["names"]
    kinds = []
    for version in spec.get("versions", []):
        if not version.get("served", True):
            continue
        kinds.append(
            Kind(
                group=spec["group"],
                version=version["name"],
                kind=names["kind"],
                plural=names["plural"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=tuple(names.get("shortNames", [])),
                categories=tuple(names.get("categories", [])),
                status_subresource="status" in (version.get("subresources") or {}),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                printer_columns=tuple(version.get("additionalPrinterColumns", [])),
            )
        )
    return kinds


@dataclass
class Registry:
    """Served kinds by (group, version, plural); CRDs add and remove theirs."""

    kinds: dict[tuple[str, str, str], Kind] = field(default_factory=dict)

    @classmethod
    def with_builtins(cls) -> Registry:
        registry = cls()
        for kind in BUILTIN:
            registry.add(kind)
        return registry

    def add(self, kind: Kind) -> None:
        self.kinds[(kind.group, kind.version, kind.plural)] = kind

    def remove_group_plural(self, group: str, plural: str) -> None:
        for key in [k for k in self.kinds if k[0] == group and k[2] == plural]:
            del self.kinds[key]

    def get(self, group: str, version: str, plural: str) -> Kind | None:
        return self.kinds.get((group, version, plural))

    def groups(self) -> dict[str, list[str]]:
        """Group name -> served versions, in a stable order."""
        result: dict[str, list[str]] = {}
        for group, version, _ in self.kinds:
            versions = result.setdefault(group, [])
            if version not in versions:
                versions.append(version)
        return result

    def in_group_version(self, group: str, version: str) -> list[Kind]:
        return [k for (g, v, _), k in self.kinds.items() if g == group and v == version]
