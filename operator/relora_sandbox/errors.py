"""API errors as the Kubernetes API server reports them: a Status object with code and reason."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error response: HTTP ``code``, Kubernetes ``reason``, and a message for people."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def not_found(resource: str, name: str) -> APIError:
    return APIError(404, "NotFound", f'{resource} "{name}" not found', details={"name": name})


def already_exists(resource: str, name: str) -> APIError:
    return APIError(
        409, "AlreadyExists", f'{resource} "{name}" already exists', details={"name": name}
    )


def conflict(resource: str, name: str) -> APIError:
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details={"name": name},
    )


def invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> APIError:
    """422 Invalid with one cause per (field, message), as schema and CEL failures are."""
    text = "; ".join(f"{field}: {message}" for field, message in causes)
    return APIError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {text}',
        details={
            "name": name,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "field": field, "message": message}
                for field, message in causes
            ],
        },
    )


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def gone(message: str) -> APIError:
    return APIError(410, "Expired", message)
