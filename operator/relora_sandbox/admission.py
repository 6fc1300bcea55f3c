"""What the API server does to an object before storing it: defaults, validation, CRD serving.

- every kind: metadata.name must be a DNS subdomain (DNS label for Namespaces);
- custom resources: pruned, defaulted and validated against their CRD's schema (CEL included);
  the status of a resource with a status subresource is ignored on create;
- CustomResourceDefinitions: accepted names and conditions set, their kinds served at once;
- Jobs: the controller-uid selector and labels, and the Job defaults, as the batch API adds them;
- Pods: Pending status and container defaults.
"""

from __future__ import annotations

import re
import uuid

from relora_sandbox import errors, schema
from relora_sandbox.kinds import Kind, Registry, from_crd
from relora_sandbox.store import Obj, Store, now

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
JOB_NAME = "batch.kubernetes.io/job-name"


class Admission:
    def __init__(self, registry: Registry, store: Store) -> None:
        self.registry, self.store = registry, store

    # ------------------------------------------------------------------ entry points
    def on_create(self, kind: Kind, body: Obj, *, strict: bool) -> list[str]:
        """Prepare ``body`` for creation in place; return warnings (unknown fields)."""
        meta = body.setdefault("metadata", {})
        if meta.get("name"):
            self._check_name(kind, meta["name"])
        warnings: list[str] = []
        if kind.schema is not None:
            if kind.status_subresource:
                body.pop("status", None)
            warnings = self._validate(kind, body, None, strict=strict)
        elif kind.key == ("batch", "jobs"):
            self._default_job(body)
        elif kind.key == ("", "pods"):
            self._default_pod(body)
        elif kind.key == ("", "namespaces"):
            body["status"] = {"phase": "Active"}
        elif kind.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._accept_crd(body)
        return warnings

    def on_update(self, kind: Kind, body: Obj, old: Obj, *, strict: bool) -> list[str]:
        if kind.schema is not None:
            return self._validate(kind, body, old, strict=strict)
        if kind.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._accept_crd(body)
        return []

    def after_write(self, kind: Kind, obj: Obj) -> None:
        """Serve what a stored CRD describes."""
        if kind.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            spec = obj["spec"]
            self.registry.remove_group_plural(spec["group"], spec["names"]["plural"])
            for served in from_crd(obj):
                self.registry.add(served)

    def after_delete(self, kind: Kind, obj: Obj) -> None:
        """Stop serving a deleted CRD and drop its objects, as the API server does."""
        if kind.key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            spec = obj["spec"]
            self.store.drop_table((spec["group"], spec["names"]["plural"]))
            self.registry.remove_group_plural(spec["group"], spec["names"]["plural"])

    # ------------------------------------------------------------------ details
    def _check_name(self, kind: Kind, name: str) -> None:
        pattern, limit = (DNS_LABEL, 63) if kind.plural == "namespaces" else (DNS_SUBDOMAIN, 253)
        if kind.key == ("batch", "jobs"):
            limit = 63  # the name becomes a label value
        if len(name) > limit or not pattern.fullmatch(name):  # no "name\n" (see re docs: $)
            raise errors.invalid(
                kind.kind,
                name,
                [
                    (
                        "metadata.name",
                        f'Invalid value: "{name}": a lowercase RFC 1123 name of at most '
                        f"{limit} characters is required",
                    )
                ],
            )

    def _validate(self, kind: Kind, body: Obj, old: Obj | None, *, strict: bool) -> list[str]:
        assert kind.schema is not None
        top = {k: v for k, v in body.items() if k != "metadata"}
        previous = {k: v for k, v in old.items() if k != "metadata"} if old is not None else None
        checked = schema.check(
            kind.schema, top, previous if previous is not None else schema.MISSING
        )
        name = body.get("metadata", {}).get("name", "")
        if strict and checked.unknown:
            fields = ", ".join(f'unknown field "{f}"' for f in checked.unknown)
            raise errors.bad_request(
                f'{kind.kind} in version "{kind.version}" cannot be handled '
                f"as a {kind.kind}: strict decoding error: {fields}"
            )
        if checked.causes:
            raise errors.invalid(f"{kind.kind}", name, checked.causes)
        for key in list(body):
            if key != "metadata" and key not in checked.value:
                del body[key]
        body.update(checked.value)
        return [f'unknown field "{f}"' for f in checked.unknown]

    def _accept_crd(self, body: Obj) -> None:
        spec = body.get("spec") or {}
        names = spec.get("names") or {}
        if not spec.get("group") or not names.get("plural") or not names.get("kind"):
            raise errors.invalid(
                "CustomResourceDefinition",
                body["metadata"].get("name", ""),
                [("spec", "group, names.plural and names.kind are required")],
            )
        expected = f"{names['plural']}.{spec['group']}"
        if body["metadata"].get("name") != expected:
            raise errors.invalid(
                "CustomResourceDefinition",
                body["metadata"].get("name", ""),
                [("metadata.name", f'must be spec.names.plural+"."+spec.group: "{expected}"')],
            )
        accepted = {k: v for k, v in names.items() if k != "categories" or v}
        accepted.setdefault("singular", names["kind"].lower())
        accepted.setdefault("listKind", f"{names['kind']}List")
        stamp = now()
        body["status"] = {
            "acceptedNames": accepted,
            "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
            "conditions": [
                {
                    "type": kind,
                    "status": "True",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": stamp,
                }
                for kind, reason, message in (
                    ("NamesAccepted", "NoConflicts", "no conflicts found"),
                    ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                )
            ],
        }

    def _default_job(self, body: Obj) -> None:
        spec = body.setdefault("spec", {})
        template = spec.get("template")
        if not isinstance(template, dict) or not (template.get("spec") or {}).get("containers"):
            raise errors.invalid(
                "Job",
                body["metadata"].get("name", ""),
                [("spec.template.spec.containers", "Required value")],
            )
        restart = template["spec"].get("restartPolicy")
        if restart not in ("Never", "OnFailure"):
            raise errors.invalid(
                "Job",
                body["metadata"].get("name", ""),
                [
                    (
                        "spec.template.spec.restartPolicy",
                        f'Unsupported value: "{restart}": supported values: "OnFailure", "Never"',
                    )
                ],
            )
        uid = str(uuid.uuid4())  # the real UID is set at creation; this one links the pods
        body["metadata"].setdefault("labels", {})
        name = body["metadata"].get("name", "")
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("suspend", False)
        spec.setdefault("completionMode", "NonIndexed")
        if not spec.get("selector"):
            spec["selector"] = {"matchLabels": {CONTROLLER_UID: uid}}
            labels = template.setdefault("metadata", {}).setdefault("labels", {})
            labels.update(
                {CONTROLLER_UID: uid, JOB_NAME: name, "controller-uid": uid, "job-name": name}
            )
        body["status"] = {}

    def _default_pod(self, body: Obj) -> None:
        spec = body.setdefault("spec", {})
        for container in spec.get("containers") or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            container.setdefault("imagePullPolicy", "IfNotPresent")
        spec.setdefault("restartPolicy", "Always")
        body["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
