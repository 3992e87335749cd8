"""vLLM's paged KV cache <-> kvmw's canonical chunk layout, one class per backend.

vLLM hands a connector one tensor per attention layer. vLLM 0.32 presents it as
a logical ``[num_blocks, num_kv_heads, block_size, C]`` view (blocks, heads,
tokens in the block, content); a token lives in slot ``block_id * block_size +
offset``. What ``C`` holds differs per backend:

- ``CPU_ATTN`` (``CPUPagedLayout``): ``C = 2 * head_dim`` but the (block, head)
  page is not token-major: the page's ``block_size * 2 * head_dim`` values are K
  stored transposed, ``[head_dim, block_size]``, then V, ``[block_size, head_dim]``.
- GPU backends that read ``kv_cache.transpose(1, 2).split(head_size, -1)``
  (FlashAttention, Triton, FlashInfer in 0.32; ``StandardPagedLayout``): each
  token's ``C`` is ``[K (head_dim) | V (head_dim)]``, possibly padded, K at
  ``0`` and V at ``C // 2``. The view may be strided (NHD or HND physically);
  indexing the logical view is correct for both.

Every layout offers ``gather(layer, slots) -> [2, T, H, D]`` and
``scatter(layer, slots, kv[2, T, H, D])`` for one layer. Runs of whole,
block-aligned blocks (what kvmw's chunks are: a chunk is a multiple of the
block size and starts on a block boundary) take a block path: one
``index_select`` / ``index_copy_`` of whole pages plus a permute; any other
slots (a chunk cut short to the tokens vLLM asked for) take a token path with
advanced indexing. No per-token Python loops.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


def slots_for_tokens(block_ids: torch.Tensor | list[int], first_block: int, start: int, end: int,
                     block_size: int) -> torch.Tensor:
    """Slots of a request's tokens ``start..end-1`` given its block ids from block
    index ``first_block`` on (``block_ids[0]`` holds tokens ``first_block * block_size...``)."""
    blocks = torch.as_tensor(block_ids, dtype=torch.long)
    t = torch.arange(start, end, dtype=torch.long)
    return blocks[t // block_size - first_block] * block_size + t % block_size


def split_whole_blocks(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """(block ids, n) such that ``slots[:n]`` is exactly those whole blocks in order
    (n a multiple of block_size, possibly 0); ``slots[n:]`` is the rest."""
    n = (slots.numel() // block_size) * block_size
    if n == 0:
        return slots.new_empty(0), 0
    rows = slots[:n].view(-1, block_size)
    first = rows[:, 0]
    ok = bool((first % block_size == 0).all()) and bool(
        (rows - first[:, None] == torch.arange(block_size, device=slots.device)).all())
    if not ok:
        return slots.new_empty(0), 0
    return first // block_size, n


class PagedLayout(ABC):
    """One backend's page interior. ``layer``: the per-layer tensor vLLM registered."""

    name = "abstract"

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int) -> None:
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    # ---- public: any slots ---------------------------------------------------------------
    def gather(self, layer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """KV of the tokens in `slots`, as ``[2, T, H, D]`` (a new tensor)."""
        slots = slots.to(device=layer.device, dtype=torch.long)
        blocks, n = split_whole_blocks(slots, self.block_size)
        if n == slots.numel():
            return self._gather_blocks(layer, blocks)
        if n == 0:
            return self._gather_tokens(layer, slots)
        return torch.cat([self._gather_blocks(layer, blocks), self._gather_tokens(layer, slots[n:])], dim=1)

    def scatter(self, layer: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Write ``kv [2, T, H, D]`` into the tokens of `slots` (cast to the cache dtype)."""
        slots = slots.to(device=layer.device, dtype=torch.long)
        kv = kv.to(device=layer.device, dtype=layer.dtype)
        blocks, n = split_whole_blocks(slots, self.block_size)
        if n:
            self._scatter_blocks(layer, blocks, kv[:, :n])
        if n < slots.numel():
            self._scatter_tokens(layer, slots[n:], kv[:, n:])

    # ---- per backend ---------------------------------------------------------------------
    @abstractmethod
    def _gather_blocks(self, layer: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _scatter_blocks(self, layer: torch.Tensor, blocks: torch.Tensor, kv: torch.Tensor) -> None: ...

    @abstractmethod
    def _gather_tokens(self, layer: torch.Tensor, slots: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _scatter_tokens(self, layer: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None: ...


class CPUPagedLayout(PagedLayout):
    """vLLM's CPU attention backend: page = K as [D, block] then V as [block, D].

    That is the vec/AVX ISAs' page; others pack it otherwise (AMX for bf16: K as
    [D/2, block, 2], V as [block/2, D, 2]). `offsets`, when given, is where each
    (token in block, channel) of K and of V sits in a head's page, ([block, D],
    [block, D]) read off vLLM's own write kernel (`probe_cpu_offsets`); every path
    then goes through those tables.

    `write_kernel(key [T, H, D], value, k_cache, v_cache, slots)`, when set (the
    connector sets vLLM's own cache-write kernel once it has checked that the
    kernel writes what `gather` reads), does the scatters: twice the bandwidth
    of the strided torch copy here."""

    name = "CPU_ATTN"

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int, write_kernel: Any = None,
                 offsets: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(block_size, num_kv_heads, head_dim)
        self.write_kernel = write_kernel
        self.offsets = offsets

    def scatter(self, layer: torch.Tensor, slots: torch.Tensor, kv: torch.Tensor) -> None:
        if self.write_kernel is None:
            return super().scatter(layer, slots, kv)
        kv = kv.to(dtype=layer.dtype)
        caches = layer.view(layer.shape[0], self.num_kv_heads, 2 * self.block_size, self.head_dim).chunk(2, dim=2)
        self.write_kernel(kv[0].contiguous(), kv[1].contiguous(), *caches, slots.to(dtype=torch.long))

    def _pages(self, layer: torch.Tensor) -> torch.Tensor:  # [blocks, H, 2 * bs * D]
        return layer.view(layer.shape[0], self.num_kv_heads, 2 * self.block_size * self.head_dim)

    def _gather_blocks(self, layer, blocks):
        bs, h, d = self.block_size, self.num_kv_heads, self.head_dim
        pages = self._pages(layer).index_select(0, blocks)  # [n, H, 2*bs*D]
        n = pages.shape[0]
        if self.offsets is not None:  # [n, H, bs*D] in (token, channel) order, then [2, n*bs, H, D]
            k, v = (pages[..., off.reshape(-1).to(pages.device)].view(n, h, bs, d) for off in self.offsets)
            return torch.stack([k, v]).permute(0, 1, 3, 2, 4).reshape(2, n * bs, h, d)
        out = torch.empty(2, n, bs, h, d, dtype=layer.dtype, device=layer.device)
        out[0].copy_(pages[..., : bs * d].view(n, h, d, bs).permute(0, 3, 1, 2))
        out[1].copy_(pages[..., bs * d:].view(n, h, bs, d).permute(0, 2, 1, 3))
        return out.view(2, n * bs, h, d)

    def _scatter_blocks(self, layer, blocks, kv):
        # indexed assignment through the K and V views of the pages: one strided copy, no
        # staging pages (vLLM hands out blocks in descending runs, so no slice view fits)
        bs, h, d = self.block_size, self.num_kv_heads, self.head_dim
        n, pages = blocks.numel(), self._pages(layer)
        if self.offsets is not None:
            hh = torch.arange(h, device=pages.device)[None, :, None]
            for i, off in enumerate(self.offsets):
                pages[blocks[:, None, None], hh, off.reshape(-1).to(pages.device)[None, None]] = (
                    kv[i].view(n, bs, h, d).permute(0, 2, 1, 3).reshape(n, h, bs * d))
            return
        pages[..., : bs * d].view(-1, h, d, bs)[blocks] = kv[0].view(n, bs, h, d).permute(0, 2, 3, 1)
        pages[..., bs * d:].view(-1, h, bs, d)[blocks] = kv[1].view(n, bs, h, d).permute(0, 2, 1, 3)

    def _token_index(self, slots: torch.Tensor):
        bs, d = self.block_size, self.head_dim
        b = (slots // bs)[:, None, None]
        o = (slots % bs)[:, None, None]
        hh = torch.arange(self.num_kv_heads, device=slots.device)[None, :, None]
        if self.offsets is not None:
            k_off, v_off = (off.to(slots.device) for off in self.offsets)
            return b, hh, k_off[o[:, 0, 0]][:, None, :], v_off[o[:, 0, 0]][:, None, :]
        dd = torch.arange(d, device=slots.device)[None, None, :]
        return b, hh, dd * bs + o, bs * d + o * d + dd  # K at d*bs+o, V at bs*D + o*D + d

    def _gather_tokens(self, layer, slots):
        pages = self._pages(layer)
        b, hh, k_at, v_at = self._token_index(slots)
        return torch.stack([pages[b, hh, k_at], pages[b, hh, v_at]])

    def _scatter_tokens(self, layer, slots, kv):
        pages = self._pages(layer)
        b, hh, k_at, v_at = self._token_index(slots)
        pages[b, hh, k_at] = kv[0]
        pages[b, hh, v_at] = kv[1]


class StandardPagedLayout(PagedLayout):
    """GPU backends' standardized [blocks, H, block, C] view, K at C[:D], V at C[C//2:C//2+D]."""

    name = "standard"

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = t.shape[-1] // 2
        return t[..., : self.head_dim], t[..., half: half + self.head_dim]

    def _gather_blocks(self, layer, blocks):
        pages = layer.index_select(0, blocks)  # [n, H, bs, C]
        k, v = self._split(pages)
        n = pages.shape[0] * self.block_size
        return torch.stack([k.transpose(1, 2).reshape(n, self.num_kv_heads, self.head_dim),
                            v.transpose(1, 2).reshape(n, self.num_kv_heads, self.head_dim)])

    def _scatter_blocks(self, layer, blocks, kv):
        n = blocks.numel()
        pages = layer.index_select(0, blocks)  # keeps any padding as it was
        k, v = self._split(pages)
        k.copy_(kv[0].view(n, self.block_size, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v.copy_(kv[1].view(n, self.block_size, self.num_kv_heads, self.head_dim).transpose(1, 2))
        layer.index_copy_(0, blocks, pages)

    def _gather_tokens(self, layer, slots):
        tok = layer[slots // self.block_size, :, slots % self.block_size]  # [T, H, C]
        k, v = self._split(tok)
        return torch.stack([k, v])

    def _scatter_tokens(self, layer, slots, kv):
        b, o = slots // self.block_size, slots % self.block_size
        half = layer.shape[-1] // 2
        layer[b, :, o, : self.head_dim] = kv[0]
        layer[b, :, o, half: half + self.head_dim] = kv[1]


def probe_cpu_offsets(write: Any, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where a CPU write kernel `write(key, value, k_cache, v_cache, slots)` puts each
    (token in block, channel) of K and of V in a head's page: ([block, D], [block, D])
    offsets, or None when what it writes is not one value per page position (a layout
    no table describes). Four writes of one block, each coding the token or the channel
    (plus 1, so 0 is "not written") into K or into V; bf16 holds these integers exactly."""
    bs, h, d = block_size, num_kv_heads, head_dim
    token = (torch.arange(bs)[:, None, None] + 1).expand(bs, h, d).to(dtype)
    channel = (torch.arange(d)[None, None, :] + 1).expand(bs, h, d).to(dtype)
    zero = torch.zeros(bs, h, d, dtype=dtype)

    def page(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        scratch = torch.zeros(1, h, 2 * bs, d, dtype=dtype)
        write(key.contiguous(), value.contiguous(), *scratch.chunk(2, dim=2), torch.arange(bs))
        return scratch.view(h, 2 * bs * d).float()

    tables = []
    for coded in ((token, zero), (zero, token)), ((channel, zero), (zero, channel)):
        tables.append([page(*pair) for pair in coded])  # [K, V] pages of this coding
    out = []
    for side in (0, 1):
        t, c = tables[0][side], tables[1][side]  # [H, 2*bs*D] token codes, channel codes
        if not torch.equal(t[0], t[-1]) or not torch.equal((t > 0), (c > 0)) or int((t[0] > 0).sum()) != bs * d:
            return None
        at = (t[0] > 0).nonzero().squeeze(1)
        offsets = torch.full((bs, d), -1, dtype=torch.long)
        offsets[t[0, at].long() - 1, c[0, at].long() - 1] = at
        if (offsets < 0).any():
            return None
        out.append(offsets)
    k_off, v_off = out
    if torch.cat([k_off.reshape(-1), v_off.reshape(-1)]).unique().numel() != 2 * bs * d:
        return None
    return k_off, v_off


def layout_for(backend_name: str, block_size: int, num_kv_heads: int, head_dim: int) -> PagedLayout:
    """The layout of a vLLM attention backend (by `AttentionBackend.get_name()`)."""
    if backend_name.upper().startswith("CPU"):
        return CPUPagedLayout(block_size, num_kv_heads, head_dim)
    return StandardPagedLayout(block_size, num_kv_heads, head_dim)
