"""A stand-in document: what RAG documents are computed after, besides the preamble.

In a RAG prompt every document but the first follows another document. A document
prefilled right after the preamble has KV that reads as the start of the
context, and the question then over-attends to it wherever it is reused (seen on
Qwen2.5-0.5B: the last document drew about three times full prefill's share of the
question's attention). Prefilled after the preamble and this fixed stand-in, a
document's KV is that of a document following another one. The text is neutral
prose with no names, numbers or instructions, so it primes nothing; its tokens
are part of the chunk key, so changing it (or passing another) is a cache miss,
never wrong KV.
"""

from __future__ import annotations

STAND_IN_TEXT = (
    "Tides rise and fall along most coasts twice in a day. The pull of the moon draws the "
    "water of the oceans into a gentle bulge on the side of the earth that faces it, and a "
    "second bulge forms on the far side, where the water lags behind the turning planet. As "
    "the earth spins beneath these bulges, a shore passes through each of them in turn, and "
    "the sea climbs the beach and then slips back again. The sun pulls on the oceans as well, "
    "though more weakly, because it is so much farther away. When the sun and the moon line "
    "up, their pulls add together and the tides reach higher and fall lower than usual; when "
    "they stand at right angles, the pulls partly cancel and the tides are mild.\n\n"
    "The shape of a coast matters as much as the sky above it. In a wide, open bay the water "
    "rises slowly and spreads across the sand, while in a narrow inlet it is squeezed between "
    "the rocks and can climb far higher. Some rivers see the incoming tide push upstream as a "
    "single rolling wave. Sailors and fishers have long watched these rhythms, timing their "
    "departures to ride the falling water out of the harbour and their returns to ride the "
    "rising water home. Tide pools left behind on rocky shores hold small worlds of their own: "
    "snails, crabs, anemones and seaweeds that must survive hours of sun and air before the "
    "sea returns. Over long ages the tides also slow the spinning of the earth by a tiny "
    "amount, and the moon drifts very slowly away, so the days grow longer and the tides "
    "change, too quietly for anyone to notice in a lifetime.\n\n"
)
