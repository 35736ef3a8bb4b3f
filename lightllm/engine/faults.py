"""Fault injection for tests and drills: make chosen model steps raise, to exercise the failure paths
(KV returned, 500 to the affected requests, the engine serving on) on a real server.

    LIGHTLLM_FAULT_STEPS=5,9     the 5th and 9th model steps of the engine process raise InjectedFault

Off unless the variable is set.
"""

from __future__ import annotations

import os


class InjectedFault(RuntimeError):
    pass


class FaultInjector:
    def __init__(self, steps: set[int]):
        self.steps = steps
        self.count = 0

    @classmethod
    def from_env(cls) -> "FaultInjector | None":
        spec = os.environ.get("LIGHTLLM_FAULT_STEPS", "").strip()
        if not spec:
            return None
        return cls({int(s) for s in spec.split(",") if s.strip()})

    def before_step(self) -> None:
        self.count += 1
        if self.count in self.steps:
            raise InjectedFault(f"injected fault at model step {self.count} (LIGHTLLM_FAULT_STEPS)")
