"""`PlacementFollower`: the replica side of live rebalancing (the router side is `RouterService`).

A group replica reports the placement version whose experts it holds in every heartbeat; the answer names the
placement to hold (None when it holds it already) and whether the last switch has settled. The follower loads
a new placement's experts on a background thread (reading only their tensors; heartbeats and forwards go on
meanwhile), then reports the new version; once the switch has settled it drops the experts the placement moved
elsewhere. Until then the group holds both sets, so a shard still on the old table is served too.
"""

import logging
import threading
import time
from collections.abc import Callable

from experts.expert_group import ExpertGroup
from experts.placement import Placement
from mistral.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)


class PlacementFollower:
    def __init__(self, group: ExpertGroup, reader: CheckpointReader, placement: Placement, name: str,
                 on_loaded: Callable[[], None] = lambda: None):
        """`on_loaded` runs after a background load, so the owner can report the new version at once."""
        self.group, self.reader, self.name, self.on_loaded = group, reader, name, on_loaded
        self.placement = placement  # the newest placement whose experts the group holds
        self._retained: int | None = None
        self._loader: threading.Thread | None = None

    @property
    def version(self) -> int:
        return self.placement.version

    def follow(self, answer: dict) -> None:
        """Act on a heartbeat answer `{"placement": Placement | None, "settled": bool}`."""
        target = answer["placement"]
        if target is not None:
            if self._loader is None or not self._loader.is_alive():
                self._loader = threading.Thread(target=self._load, args=(target,), name="msem-rebalance",
                                                daemon=True)
                self._loader.start()
        elif answer["settled"] and self._retained != self.placement.version:
            dropped = self.group.retain(self.placement)
            self._retained = self.placement.version
            if dropped:
                logger.info("%s dropped %d experts that placement v%d moved away", self.name, dropped,
                            self.placement.version)

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background load (if any) has finished."""
        if self._loader is not None:
            self._loader.join(timeout)

    def _load(self, target: Placement) -> None:
        started = time.monotonic()
        try:
            loaded = self.group.extend(self.reader, target)
        except Exception:  # noqa: BLE001 - the router abandons a placement a replica cannot load
            logger.exception("%s could not load placement v%d", self.name, target.version)
            return
        self.placement = target
        logger.info("%s loaded %d experts of placement v%d in %.2f s", self.name, loaded, target.version,
                    time.monotonic() - started)
        self.on_loaded()
