"""Findings: what a health monitor tells the user."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a stable upper-case ``code``, a severity, the step, and a message that
    says what is wrong in the user's terms and how to fix it."""

    code: str
    severity: str
    step: int
    message: str

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding severity {self.severity!r} is not one of {SEVERITIES}")
        if not self.code or self.code.upper() != self.code:
            raise ValueError(f"Finding code {self.code!r} must be a non-empty upper-case name")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Finding":
        return cls(code=d["code"], severity=d["severity"], step=int(d["step"]), message=d["message"])

    def __str__(self) -> str:
        return f"[{self.severity.upper()}] {self.code} at step {self.step}: {self.message}"
