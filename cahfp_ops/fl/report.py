"""What a round did: one :class:`ClientRecord` per client, gathered in a :class:`RoundReport`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class ClientRecord:
    """One client's part in one round.

    ``status`` is ``"accepted"``, ``"rejected"`` (``reason`` says why) or ``"absent"`` (assigned,
    no reply). Traffic counts: down for every assigned client, up for accepted ones (0 otherwise).
    ``update_size``: the RMS of its delta over its kept floating entries (as sent);
    ``clip_scale``: the factor its delta was scaled by when the update bound clipped it.
    """

    client: Hashable
    status: str
    reason: str | None = None
    weight: float | None = None
    params_down: int = 0
    bytes_down: int = 0
    params_up: int = 0
    bytes_up: int = 0
    training_flops: int = 0
    update_size: float | None = None  # RMS of its delta over its kept entries (checked replies)
    clip_scale: float | None = None  # < 1 when its delta was clipped to the bound


@dataclass
class RoundReport:
    """What happened in one round: a :class:`ClientRecord` per client, in reply order then absent
    ones. ``duplicates``: the other replies of clients that replied more than once (each
    rejected with its reason; the client's record is its first well-formed reply).
    ``update_median`` / ``update_bound``: the median update size the relative bound is taken
    from, and the bound applied (the smaller of the relative and the absolute bound; None: none).
    """

    round: int
    clients: dict[Hashable, ClientRecord] = field(default_factory=dict)
    full_params: int = 0
    full_training_flops: int = 0
    update_median: float | None = None  # median update size the bound is taken from
    update_bound: float | None = None  # the bound applied (None: none)
    duplicates: list[ClientRecord] = field(default_factory=list)
    reduce: str = "mean"  # how the accepted replies were combined

    @property
    def clipped(self) -> dict:
        """client -> the factor its delta was scaled by."""
        return {c: r.clip_scale for c, r in self.clients.items() if r.clip_scale is not None}

    @property
    def accepted(self) -> list:
        return [c for c, r in self.clients.items() if r.status == "accepted"]

    @property
    def rejected(self) -> dict:
        """client -> reason."""
        return {c: r.reason for c, r in self.clients.items() if r.status == "rejected"}

    @property
    def absent(self) -> list:
        return [c for c, r in self.clients.items() if r.status == "absent"]

    def reject(self, cid: Hashable, reason: str) -> None:
        """Mark ``cid`` rejected (e.g. a framework-level failure of an assigned client)."""
        record = self.clients.setdefault(cid, ClientRecord(cid, "rejected"))
        record.status, record.reason = "rejected", reason
        record.params_up = record.bytes_up = 0
