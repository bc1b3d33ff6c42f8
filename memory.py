"""
The KV cache of the streaming model, and the policies that decide what it keeps and where it sits in time.

Per layer and per cached frame the cache stores keys and values *before* RoPE (top-k history routing scores
frames by their mean key *after* RoPE, which it recomputes on every call: attention.route). Positions are
assigned when the cache is read, so each policy is a few lines:

  full     keep every frame at its absolute position. Memory and per-chunk cost grow linearly, and once the
           stream is longer than the training clip the model sees distances it never trained on: the
           baseline that breaks.
  window   keep the last `window` frames (Self Forcing / CausVid rolling KV cache).
  sink     keep the first `sink` frames for good plus the last `window` frames (StreamingLLM's attention
           sink, used by Rolling Forcing and LongLive). The sink is placed just before the window, as
           Rolling Forcing re-rotates it on every call.
  slowfast the sink, a slow memory of up to `slow` frames and a fast FIFO of the last `window` frames (Context
           Forcing). A frame leaving the fast FIFO is promoted to slow memory only if it is surprising: the
           cosine similarity of its key descriptor to its predecessor's is below `tau`; slow memory drops its
           oldest frame when full. Redundant frames (a still scene) are dropped, so the same bytes cover a
           longer past. Decisions Context Forcing leaves open, taken here: the descriptor of a frame is its
           pre-RoPE keys averaged over its tokens, per layer, concatenated over layers; promotion is per frame;
           the similarity is the mean over the batch's streams (they share one layout); the predecessor of a
           frame is the frame just before it in the stream; the kept frames sit in time order.

Bounded positions (window, sink, slowfast): the kept frames are re-indexed to contiguous positions 0..n-1 and the
current chunk follows them, so the largest position ever used is sink + window + chunk - 1 however long the
stream runs (Infinity-RoPE, Context Forcing). RoPE only sees relative distances, so for a plain window this
re-indexing changes no output; it is what keeps the sink (and every absolute number) inside the trained range.
"""

from dataclasses import dataclass

import torch

POLICIES = ("full", "window", "sink", "slowfast")


@dataclass
class MemoryConfig:
    policy: str = "sink"
    window: int = 6     # recent history frames kept (window, sink; slowfast: the fast FIFO)
    sink: int = 3       # first frames kept for good (sink, slowfast)
    slow: int = 0       # slowfast: frames of slow memory
    tau: float = 0.95   # slowfast: a frame leaving fast memory is promoted if its similarity is below tau

    def check(self, chunk: int, trained_frames: int):
        """Raise ValueError if this policy would stream outside the model's trained positions."""
        if self.policy not in POLICIES:
            raise ValueError(f"unknown memory policy {self.policy!r} (choose from {', '.join(POLICIES)})")
        if self.policy == "full":
            return   # allowed on purpose: it is the baseline that leaves the trained range
        sink = self.sink if self.policy in ("sink", "slowfast") else 0
        slow = self.slow if self.policy == "slowfast" else 0
        if self.window < 1 or sink < 0 or slow < 0:
            raise ValueError(f"memory window must be >= 1, sink and slow >= 0 (got window={self.window}, sink={sink}, "
                             f"slow={slow})")
        if self.policy == "slowfast" and not -1 <= self.tau <= 1:
            raise ValueError(f"memory tau is a cosine similarity, in [-1, 1] (got {self.tau})")
        if sink + slow + self.window + chunk > trained_frames:
            raise ValueError(f"memory sink {sink} + {f'slow {slow} + ' if slow else ''}window {self.window} + chunk "
                             f"{chunk} frames exceeds the {trained_frames} frames the model was trained on")


def describe(kvs: list, n: int) -> torch.Tensor:
    """Key descriptors (B, n, depth * H * hd) of n frames from their per-layer (k, v), each (B, n*L, H, hd): the
    pre-RoPE keys averaged over each frame's tokens, concatenated over layers."""
    return torch.cat([k.detach().unflatten(1, (n, -1)).float().mean(2).flatten(2) for k, _ in kvs], dim=-1)


class KVCache:
    """Pre-RoPE keys/values of finished frames, for every layer. Frames are appended a chunk at a time."""

    def __init__(self, cfg: MemoryConfig, depth: int):
        assert cfg.policy in POLICIES, cfg.policy
        self.cfg = cfg
        self.k = [None] * depth        # per layer (B, Fc, L, H, hd)
        self.v = [None] * depth
        self.x = None                  # the clean frames themselves (B, Fc, C, H, W): a prompt switch re-encodes them
        self.frames = []               # absolute index of each cached frame, oldest first
        self.next_frame = 0            # absolute index of the next frame the stream will produce
        self.slow = []                 # slowfast: the frames of slow memory (absolute indices)
        self.descriptors = {}          # slowfast: frame -> key descriptor (B, depth * H * hd), of the frames kept
        self.promoted = 0              # slowfast: frames promoted to slow memory so far

    def __len__(self):
        return len(self.frames)

    def positions(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Time positions of the cached frames (Fc,) and of the n query frames that come next (n,)."""
        if self.cfg.policy == "full":
            cached = torch.tensor(self.frames, dtype=torch.long)
            query = torch.arange(self.next_frame, self.next_frame + n)
        else:
            cached = torch.arange(len(self.frames))
            query = torch.arange(len(self.frames), len(self.frames) + n)
        return cached, query

    def kv(self, layer: int):
        """(k, v) of layer `layer` as (B, Fc*L, H, hd) each, or None while the cache is empty."""
        if self.k[layer] is None:
            return None
        return self.k[layer].flatten(1, 2), self.v[layer].flatten(1, 2)

    @torch.no_grad()
    def append(self, kvs: list, x: torch.Tensor):
        """Add the n finished frames x (B, n, C, H, W) with their keys/values: one (k, v) per layer, each
        (B, n*L, H, hd). Then evict."""
        n = x.shape[1]
        self.x = x.detach() if self.x is None else torch.cat([self.x, x.detach()], dim=1)
        for i, (k, v) in enumerate(kvs):
            k, v = k.detach().unflatten(1, (n, -1)), v.detach().unflatten(1, (n, -1))   # (B, n, L, H, hd)
            self.k[i] = k if self.k[i] is None else torch.cat([self.k[i], k], dim=1)
            self.v[i] = v if self.v[i] is None else torch.cat([self.v[i], v], dim=1)
        new = range(self.next_frame, self.next_frame + n)
        if self.cfg.policy == "slowfast":
            self.descriptors.update(zip(new, describe(kvs, n).unbind(1)))
        self.frames += new
        self.next_frame += n
        self._evict()

    def _evict(self):
        keep = self._keep()
        if len(keep) == len(self.frames):
            return
        idx = torch.tensor(keep, device=self.k[0].device)
        for i in range(len(self.k)):
            self.k[i], self.v[i] = self.k[i].index_select(1, idx), self.v[i].index_select(1, idx)
        self.x = self.x.index_select(1, idx)
        self.frames = [self.frames[j] for j in keep]

    def _keep(self) -> list[int]:
        """Indices (into self.frames) of the frames the policy keeps, in time order."""
        n, cfg = len(self.frames), self.cfg
        if cfg.policy == "full":
            return list(range(n))
        sink = [j for j in range(n) if cfg.policy in ("sink", "slowfast") and self.frames[j] < cfg.sink]
        if cfg.policy == "slowfast":
            return self._consolidate(sink)
        recent = [j for j in range(max(0, n - cfg.window), n) if j not in sink]
        return sink + recent

    def _consolidate(self, sink: list[int]) -> list[int]:
        """slowfast: promote the surprising frames that leave the fast FIFO, drop the others and the oldest slow."""
        cfg, frames = self.cfg, self.frames
        fast = [j for j in range(len(frames)) if j not in sink and frames[j] not in self.slow]
        for j in fast[:max(0, len(fast) - cfg.window)]:   # leaving fast memory, oldest first
            f = frames[j]
            d, before = self.descriptors[f], self.descriptors.get(f - 1)
            similar = before is not None and torch.cosine_similarity(d, before, dim=-1).mean() >= cfg.tau
            if not similar and cfg.slow > 0:
                self.slow = (self.slow + [f])[-cfg.slow:]
                self.promoted += 1
        keep = sorted(set(sink) | {j for j in range(len(frames)) if frames[j] in self.slow}
                      | set(fast[max(0, len(fast) - cfg.window):]))
        kept = {frames[j] for j in keep}
        # a frame's descriptor is kept while the frame is, and one frame longer: the next one to leave compares to it
        last_left = max((f for f in self.descriptors if f not in kept), default=None)
        self.descriptors = {f: d for f, d in self.descriptors.items() if f in kept or f == last_left}
        return keep

    def rewrite(self, kvs: list):
        """Replace the keys/values of every kept frame (per layer (B, Fc*L, H, hd), in the cache's frame order), as
        a prompt switch does; the frames, their positions and slow memory stay as they are."""
        n = len(self.frames)
        self.k = [k.detach().unflatten(1, (n, -1)) for k, _ in kvs]
        self.v = [v.detach().unflatten(1, (n, -1)) for _, v in kvs]
        if self.cfg.policy == "slowfast":
            self.descriptors.update(zip(self.frames, describe(kvs, n).unbind(1)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v, self.x] if t is not None)
