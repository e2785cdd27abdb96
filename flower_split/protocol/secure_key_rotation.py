"""CKKS key rotation on the tenant's side (``he`` label protection), a mixin of the secure client.

The tenant generates a new key pair and keeps it pending; labels stay encrypted under the
current key until the cloud is seen to hold the new one (over Flower its key id comes with
every ``secure_begin`` and ``secure_rekey``). The protocol is in docs/he.md, section 6.
"""

from __future__ import annotations

from flower_split.he import ClientKeys
from flower_split.protocol.messages import ProtocolError
from flower_split.protocol.secure_messages import KeyRotation


class TenantKeyRotation:
    """The current and pending CKKS keys of one tenant, and the two rotation steps."""

    tenant: str
    label_protection: str
    halves: object | None
    he_keys: ClientKeys | None
    _pending_he_keys: ClientKeys | None

    @property
    def he_key_id(self) -> bytes | None:
        """Id of the CKKS key the labels are encrypted under (None in 'client' label protection)."""
        return None if self.he_keys is None else self.he_keys.key_id

    @property
    def pending_he_key_id(self) -> bytes | None:
        """Id of a rotated key the cloud has not yet been seen to hold (None when there is none)."""
        return None if self._pending_he_keys is None else self._pending_he_keys.key_id

    def start_key_rotation(self) -> KeyRotation:
        """A new CKKS key pair (same parameters); returns its public context for the cloud.

        The new key stays pending: labels are still encrypted under the current key until
        :meth:`confirm_key_rotation`. While a key is pending (its rotation lost, or not yet
        acknowledged), this returns the same rotation again rather than a newer one, so a
        retry and a late copy of the first message are one rotation, and whichever the
        cloud accepts, the client can follow.
        """
        if self.halves is None:
            raise ProtocolError(f"tenant {self.tenant!r}: call setup() first")
        if self.he_keys is None:
            raise ProtocolError(f"tenant {self.tenant!r}: label protection {self.label_protection!r} "
                                "has no CKKS keys to rotate")
        if self._pending_he_keys is None:
            self._pending_he_keys = self.he_keys.rotate()
        pending = self._pending_he_keys
        return KeyRotation(self.tenant, self.he_keys.key_id, pending.key_id, pending.public_bytes())

    def confirm_key_rotation(self, cloud_key_id: object) -> bool:
        """Switch to the pending key once the cloud reports holding it; True if it switched.

        ``cloud_key_id`` is the key id the cloud holds for this tenant (over Flower it comes with
        every ``secure_begin`` and ``secure_rekey``). The current key: nothing changes, a pending
        rotation stays pending. The pending key: the client switches and drops the old one. Any
        other id: the parties disagree (ProtocolError, nothing changes).
        """
        if self.he_keys is None:
            raise ProtocolError(f"tenant {self.tenant!r}: label protection {self.label_protection!r} "
                                "has no CKKS keys")
        if cloud_key_id == self.he_keys.key_id:
            return False
        pending = self._pending_he_keys
        if pending is None or cloud_key_id != pending.key_id:
            shown = cloud_key_id.hex() if isinstance(cloud_key_id, bytes) else repr(cloud_key_id)
            raise ProtocolError(
                f"tenant {self.tenant!r}: the cloud holds CKKS key {shown}, the client encrypts under "
                f"{self.he_keys.key_id.hex()} (pending rotation: "
                f"{'none' if pending is None else pending.key_id.hex()})")
        self.he_keys, self._pending_he_keys = pending, None
        return True
