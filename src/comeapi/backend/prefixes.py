"""Prompt prefixes kept in the batched engine's KV streams for later prompts.

When a sequence leaves its slot, the slot keeps the cells of its prompt's whole chunks. A new
prompt takes the free slot whose kept prefix it shares most, or copies a longer one from any
other stream (``llama_memory_seq_cp``), and computes only the rest. Reused cells are the ones a
fresh prefill computes, to the bit (``reusable_prefix``), so an answer does not depend on what
ran before it (docs/batching.md, "Shared prompt prefixes").
"""

from __future__ import annotations

from comeapi.backend.decoding import PREFILL_CHUNK, reusable_prefix
from comeapi.backend.native import NativeModel


class PrefixCache:
    """Which prompt tokens each free stream still holds. Used by the decode thread only."""

    def __init__(self, model: NativeModel, slots: int):
        self._model = model
        self.held: list[list[int]] = [[] for _ in range(slots)]

    def choose(self, free: list[int], prompt: list[int] | None) -> int:
        """The free slot for ``prompt`` (None: a prompt that reuses nothing): the one whose
        kept prefix serves it best; among equals the one keeping least, then the lowest."""

        def value(slot: int) -> tuple[int, int, int]:
            reused = reusable_prefix(self.held[slot], prompt) if prompt is not None else 0
            return reused, -len(self.held[slot]), -slot

        return max(free, key=value)

    def take(self, slot: int, prompt: list[int] | None, busy: list[list[int]]) -> int:
        """Hand ``slot`` to a sequence: keep the longest reusable prefix of ``prompt``,
        copied from another stream when one holds a longer one (``busy``: the prompt
        tokens each busy stream has computed), and drop every other cell. Returns how many
        prompt tokens are kept."""
        held, self.held[slot] = self.held[slot], []
        if prompt is None:
            self._model.forget(slot)
            return 0
        best, source = reusable_prefix(held, prompt), slot
        for other, tokens in enumerate(busy):
            if other == slot:
                continue
            reused = reusable_prefix(tokens or self.held[other], prompt)
            # Sliding-window layers overwrite a long sequence's early cells: nothing to copy.
            if reused > best and self._model.first_position(other) == 0:
                best, source = reused, other
        if source != slot:
            self._model.copy(source, slot)
        self._model.forget(slot, best)
        return best

    def keep(self, slot: int, computed: list[int]) -> None:
        """A sequence left ``slot`` with ``computed`` prompt tokens in it: keep their whole
        chunks, drop the rest (a partial chunk, generated tokens), or everything if
        sliding-window layers lost early cells."""
        kept = len(computed) // PREFILL_CHUNK * PREFILL_CHUNK
        self._model.forget(slot, kept)
        if kept and self._model.first_position(slot) != 0:
            self._model.forget(slot)
            kept = 0
        self.held[slot] = computed[:kept]
