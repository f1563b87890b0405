"""Resident weights of the layers a GPU budget cannot hold: kept in host memory, streamed in per layer.

When the always-used path does not fit the GPU (the plan's `cpu_layers`), those layers' weights live in
one packed (pinned) host buffer per layer. Their tensors on the device are views into one of two device
buffers; just before a spilled layer runs, its packed bytes are copied into its buffer, so the layer code
is the same as for a resident one. The copy of the next spilled layer starts on a side stream while this
one computes. A compact Linear (kernels/) is packed as its tensors and rebuilt over their views. The
routers stay resident: the lookahead prefetch reads the next layer's router while the
current layer computes, when the next layer's buffer may still hold another layer.
"""

from __future__ import annotations

import torch

from ..kernels import CompactLinear

Weight = torch.Tensor | CompactLinear
ALIGN = 256  # bytes: every view starts on an aligned address, as the kernels expect of a fresh tensor


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def stays_resident(name: str) -> bool:
    """Tensors of a spilled layer that are kept on the device anyway (small, read out of turn)."""
    return name.endswith("mlp.gate.weight")


def _flat(weights: dict[str, Weight]) -> dict[str, torch.Tensor]:
    """Every tensor of a layer's weights, a compact Linear's under `name|part`."""
    out = {}
    for name, w in weights.items():
        items = {"": w}.items() if isinstance(w, torch.Tensor) else w.tensors().items()
        out.update({f"{name}|{part}" if part else name: t for part, t in items})
    return out


def _unflat(weights: dict[str, Weight], views: dict[str, torch.Tensor]) -> dict[str, Weight]:
    """The layer's weights over `views` (what _flat listed): compact Linears rebuilt on them."""
    out = {}
    for name, w in weights.items():
        if isinstance(w, torch.Tensor):
            out[name] = views[name]
        else:
            parts = {k.split("|", 1)[1]: v for k, v in views.items() if k.split("|", 1)[0] == name}
            out[name] = w.with_tensors(parts)
    return out


class SpilledLayers:
    def __init__(self, weights: dict[int, dict[str, Weight]], device: torch.device) -> None:
        """weights: layer index -> {name: host tensor or compact Linear}. Afterwards `views[i]` holds layer
        i's weights on the device (views into its buffer; a compact Linear over views of its tensors)."""
        layers = {i: _flat(w) for i, w in weights.items()}
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.order = sorted(layers)
        self.packed: dict[int, torch.Tensor] = {}
        layouts: dict[int, list[tuple[str, int, torch.Tensor]]] = {}
        for i in self.order:
            layouts[i], size = [], 0
            for name, t in layers[i].items():
                layouts[i].append((name, size, t))
                size += _aligned(t.numel() * t.element_size())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.on_cuda)
            for _, off, t in layouts[i]:
                n = t.numel() * t.element_size()
                buf[off : off + n].copy_(t.contiguous().view(-1).view(torch.uint8))
            self.packed[i] = buf
        largest = max((b.numel() for b in self.packed.values()), default=0)
        self.buffers = [
            torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(min(2, len(self.order)))
        ]
        self.buffer_of = {i: k % 2 for k, i in enumerate(self.order)}
        self.views: dict[int, dict[str, torch.Tensor]] = {}
        for i in self.order:
            buf = self.buffers[self.buffer_of[i]]
            views = {
                name: buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                for name, off, t in layouts[i]
            }
            self.views[i] = _unflat(weights[i], views)
        self._next = {a: b for a, b in zip(self.order, self.order[1:])}
        # the one copy started ahead (layer, its event): a forward cut short leaves a stale one behind,
        # which the next forward's first spilled layer replaces
        self._pending: tuple[int, torch.cuda.Event | None] | None = None
        self.stream = torch.cuda.Stream(device) if self.on_cuda else None
        self.bytes_copied = 0

    def __contains__(self, layer: int) -> bool:
        return layer in self.packed

    def before(self, layer: int) -> None:
        """Make layer's weights valid on the device (wait for its copy), then start the next one's."""
        pending, self._pending = self._pending, None
        ev = pending[1] if pending is not None and pending[0] == layer else self._copy(layer)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        nxt = self._next.get(layer)
        if nxt is not None:
            # its buffer was last read by the spilled layer before this one, already queued on the
            # compute stream: the side stream waits for everything queued so far
            self._pending = (nxt, self._copy(nxt))

    def _copy(self, layer: int) -> torch.cuda.Event | None:
        """Start copying layer's packed bytes into its buffer; the event of the copy (None on the CPU)."""
        src, dst = self.packed[layer], self.buffers[self.buffer_of[layer]]
        self.bytes_copied += src.numel()
        if not self.on_cuda:
            dst[: src.numel()].copy_(src)
            return None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst[: src.numel()].copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        return ev
