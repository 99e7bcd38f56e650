"""Replies that carry no outputs, built in one place so every one echoes the model and version."""

from __future__ import annotations

from typing import Any

from ml_worker.batcher import Pending
from ml_worker.slots import ModelSlot
from shared import protocol
from shared.protocol import Status


def to(p: Pending, status: Status, message: str, **extra: Any) -> list[Any]:
    """The reply to a request that was admitted (queued, parked or running) and ends without outputs."""
    return protocol.reply(p.msg_id, status, version=p.version, model=p.model, message=message, **extra)


def version_unavailable(slot: ModelSlot, msg_id: str, version: Any) -> list[Any]:
    """A request for a version this worker does not hold; the reply names the live one to re-encode for."""
    return protocol.reply(
        msg_id,
        Status.VERSION_UNAVAILABLE,
        version=slot.live_version,
        model=slot.name,
        message=f"version {version} is not loaded on this worker",
    )


def not_served(msg_id: str, model: Any) -> list[Any]:
    return protocol.reply(msg_id, Status.MODEL_NOT_FOUND, message=f"model {model!r:.80} is not served by this worker")
