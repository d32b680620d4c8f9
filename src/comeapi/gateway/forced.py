"""The variant slot a trusted proxy chose for a request: nginx's ``split_clients`` slot, or
warmup's, sent as ``X-Comeapi-Variant`` with the shared secret in
``X-Comeapi-Variant-Secret``. From anyone without the secret the header means nothing."""

from __future__ import annotations

import hmac

from comeapi.errors import RequestError

VARIANT_HEADER = "x-comeapi-variant"
SECRET_HEADER = "x-comeapi-variant-secret"
#: On an answer to a forced slot whose own variant is not served: the slot asked for (the
#: answer is another, servable variant, named by X-Cache-Variant).
SLOT_HEADER = "x-comeapi-slot"
#: On a forwarded answer the cache would not serve (not reviewed while only approved answers
#: are served, or a prompt whose answers were all turned down): a proxy must not keep it.
NO_STORE_HEADER = "x-comeapi-no-store"


class ForcedVariants:
    """The rule for ``X-Comeapi-Variant``: obeyed only with the secret, and only in range."""

    def __init__(self, secret: str | None, variants: int):
        self._secret = secret.encode() if secret else None
        self.variants = variants

    def __bool__(self) -> bool:
        """Whether any request can force a slot (a secret is set)."""
        return self._secret is not None

    def read(self, variant: bytes | None, secret: bytes) -> int | None:
        """The slot asked for, or None (no header, or not from the trusted proxy).
        RequestError when the trusted proxy asks for a slot out of range."""
        if variant is None or self._secret is None:
            return None
        if not hmac.compare_digest(secret, self._secret):
            return None
        if not variant.isdigit() or int(variant) >= self.variants:
            raise RequestError(
                f"{VARIANT_HEADER}: expected 0..{self.variants - 1}, got {variant.decode()!r}",
                param=VARIANT_HEADER,
            )
        return int(variant)
