"""What `launch` needs to know about a rented machine, whichever marketplace rents it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["starting", "running", "failed"]


@dataclass
class Instance:
    """One instance as last seen: its state and where its ports are reachable."""

    id: str
    state: State
    detail: str  # the marketplace's own status word, for messages
    urls: dict[str, str] = field(default_factory=dict)  # port name -> URL ("api" -> http://...)
    cost_per_hr: float | None = None
    # Where the platform says the machine is before it runs: "scheduled" (a machine is being
    # assigned) or "pulling" (the image downloads, the container starts); None = derive from state.
    phase: str | None = None
    pulled: tuple[int, int | None] | None = None  # (bytes done, bytes in all) of the image pull, where the API gives them

    def health_url(self, port_name: str = "api") -> str | None:
        """`GET /health` of the image's HTTP service (the self-test report)."""
        base = self.urls.get(port_name)
        if not base or not base.startswith("http"):
            return None
        return base.rstrip("/") + "/health"

    def ssh_address(self) -> tuple[str, int] | None:
        """(host, port) of the instance's SSH port, if it publishes one."""
        for url in self.urls.values():
            if url.startswith("ssh://"):
                host, _, port = url[len("ssh://"):].rpartition(":")
                if host and port.isdigit():
                    return host, int(port)
        return None
