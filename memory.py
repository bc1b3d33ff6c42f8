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
           pre-RoPE keys, every token's key minus the frame's mean key, over all layers (the mean key alone
           is almost the same for every frame: consecutive frames of the shipped models have cosine > 0.998,
           so at tau 0.95 nothing would ever be promoted; what is left after centring is the layout of the
           frame, which changes when something appears, moves or leaves); promotion is per frame; the
           similarity is the mean over the batch's streams (they share one layout); the predecessor of a
           frame is the frame just before it in the stream; the kept frames sit in time order. Descriptors
           are read from the cached keys when a frame leaves the fast FIFO, so slowfast stores only one more:
           the last frame that left, which its successor compares with.
           A fixed tau promotes very different shares on different scenes, because how alike consecutive frames
           are depends on the scene (median similarity 0.77 to 0.99 over the 8 test scenes for the context
           model, docs/context.md section 7): at tau 0.95 one scene promoted 4% of its frames and another all
           of them, where slow memory is only a delayed FIFO. With `promote` = p > 0 a frame is surprising when
           its similarity is below the p-quantile of the similarities of the last RECENT frames that left: about
           a share p is promoted on every scene, so slow memory reaches back about slow / (p * fps) seconds.

Bounded positions (window, sink, slowfast): the kept frames are re-indexed to contiguous positions 0..n-1 and the
current chunk follows them, so the largest position ever used is sink + window + chunk - 1 however long the
stream runs (Infinity-RoPE, Context Forcing). RoPE only sees relative distances, so for a plain window this
re-indexing changes no output; it is what keeps the sink (and every absolute number) inside the trained range.

At a prompt switch the sink keeps the first scene's frames, re-encoded under the new prompt (LongLive). With
`resink` the sink moves instead: the old sink frames become history (evicted as history is) and the next `sink`
frames the stream makes, the first under the new prompt, are the sink from then on. A model trained on clips of
one scene has only ever seen a sink of the scene it is drawing; on the default it follows switches no better
(docs/distillation.md, section 8), so it is off unless asked for. Without `reencode` the kept frames keep the
keys they were made with, under the old prompt: what a model trained with a caption per frame (train.py
--event-clips) read in training, where a frame before a scene event is conditioned on its own caption.
"""

from dataclasses import dataclass

import torch

POLICIES = ("full", "window", "sink", "slowfast")
RECENT = 256   # slowfast with promote: the similarities of this many frames that left set the threshold


@dataclass
class MemoryConfig:
    policy: str = "sink"
    window: int = 6     # recent history frames kept (window, sink; slowfast: the fast FIFO)
    sink: int = 3       # first frames kept for good (sink, slowfast)
    slow: int = 0       # slowfast: frames of slow memory
    tau: float = 0.95   # slowfast: a frame leaving fast memory is promoted if its similarity is below tau
    promote: float = 0.0   # slowfast: if > 0, promote the share of frames least like their predecessor instead
    resink: bool = False   # sink, slowfast: a prompt switch moves the sink to the first frames made after it
    reencode: bool = True  # a prompt switch re-encodes the kept frames under the new prompt (LongLive's re-cache)

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
        if self.policy == "slowfast" and not 0 <= self.promote < 1:
            raise ValueError(f"memory promote is a share of frames, in [0, 1) (got {self.promote})")
        if sink + slow + self.window + chunk > trained_frames:
            raise ValueError(f"memory sink {sink} + {f'slow {slow} + ' if slow else ''}window {self.window} + chunk "
                             f"{chunk} frames exceeds the {trained_frames} frames the model was trained on")


def filling(policy: str, frames: int, chunk: int, query: int, sink: int | None = None, window: int | None = None,
            slow: int | None = None, tau: float = 0.95, promote: float = 0.0) -> MemoryConfig:
    """A memory whose unset sizes fill the model's trained range (`frames`) beside a call of `query` frames: the
    sink one chunk (sink, slowfast); window the rest (window, sink) or one chunk (slowfast, whose slow memory
    takes the rest). So every bounded policy holds the same number of frames: equal cache bytes."""
    sink = chunk if sink is None else sink
    history = frames - query - (sink if policy in ("sink", "slowfast") else 0)
    window = window if window is not None else (chunk if policy == "slowfast" else history)
    slow = slow if slow is not None else max(0, history - window)
    return MemoryConfig(policy=policy, window=window, sink=sink, slow=slow, tau=tau, promote=promote)


def describe(keys: list) -> torch.Tensor:
    """Key descriptor (B, depth * L * H * hd) of one frame from its pre-RoPE keys, one (B, L, H, hd) per layer:
    each token's key minus the frame's mean key, concatenated over layers."""
    return torch.cat([(k.float() - k.float().mean(1, keepdim=True)).flatten(1) for k in keys], dim=-1)


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
        self.sink_from = 0             # sink, slowfast: absolute index of the first sink frame (move_sink)
        self.slow = []                 # slowfast: the frames of slow memory (absolute indices)
        self.last_left = None          # slowfast: (frame, descriptor) of the last frame that left the cache
        self.promoted = 0              # slowfast: frames promoted to slow memory so far
        self.left = 0                  # slowfast: frames that have left the fast FIFO so far (promoted or dropped)
        self.sims = []                 # slowfast with promote: similarities of the last RECENT frames that left

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
        self.frames += range(self.next_frame, self.next_frame + n)
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
        sink = [j for j in range(n) if cfg.policy in ("sink", "slowfast")
                and self.sink_from <= self.frames[j] < self.sink_from + cfg.sink]
        if cfg.policy == "slowfast":
            return self._consolidate(sink)
        recent = [j for j in range(max(0, n - cfg.window), n) if j not in sink]
        return sink + recent

    def move_sink(self):
        """The next `sink` frames the stream makes become the sink (memory resink, at a prompt switch); the frames
        of the old sink are history from now on, kept or evicted as the policy keeps history."""
        self.sink_from = self.next_frame
        if self.frames:
            self._evict()

    def _consolidate(self, sink: list[int]) -> list[int]:
        """slowfast: promote the surprising frames that leave the fast FIFO, drop the others and the oldest slow."""
        cfg, frames = self.cfg, self.frames
        fast = [j for j in range(len(frames)) if j not in sink and frames[j] not in self.slow]
        for j in fast[:max(0, len(fast) - cfg.window)]:   # leaving fast memory, oldest first
            f, d = frames[j], self._descriptor(j)
            # the predecessor most often left just before (its descriptor is at hand), else it is still kept
            before = self.last_left[1] if self.last_left and self.last_left[0] == f - 1 else \
                self._descriptor(frames.index(f - 1)) if f - 1 in frames else None
            sim = None if before is None else float(torch.cosine_similarity(d, before, dim=-1).mean())
            similar = sim is not None and not self._surprising(sim)
            if not similar and cfg.slow > 0:
                self.slow = (self.slow + [f])[-cfg.slow:]
                self.promoted += 1
            self.last_left = (f, d)   # (if it was promoted it stays, and the next one finds it in the cache)
            self.left += 1
        return sorted(set(sink) | {j for j in range(len(frames)) if frames[j] in self.slow}
                      | set(fast[max(0, len(fast) - cfg.window):]))

    def reach(self) -> int:
        """slowfast: how many frames back the oldest frame of slow memory lies (0 while it is empty)."""
        return self.next_frame - min(self.slow) if self.slow else 0

    def _surprising(self, sim: float) -> bool:
        """Below tau, or with promote, below the promote-quantile of the recent similarities (then recorded)."""
        if not self.cfg.promote:
            return sim < self.cfg.tau
        surprising = not self.sims or sim < float(torch.quantile(torch.tensor(self.sims), self.cfg.promote))
        self.sims = (self.sims + [sim])[-RECENT:]
        return surprising

    def _descriptor(self, j: int) -> torch.Tensor:
        return describe([k[:, j] for k in self.k])

    def rewrite(self, kvs: list):
        """Replace the keys/values of every kept frame (per layer (B, Fc*L, H, hd), in the cache's frame order), as
        a prompt switch does; the frames, their positions and slow memory stay as they are."""
        n = len(self.frames)
        self.k = [k.detach().unflatten(1, (n, -1)) for k, _ in kvs]
        self.v = [v.detach().unflatten(1, (n, -1)) for _, v in kvs]
        if self.last_left and self.last_left[0] in self.frames:   # a promoted frame: its descriptor follows its keys
            self.last_left = (self.last_left[0], self._descriptor(self.frames.index(self.last_left[0])))

    def snapshot(self) -> "KVCache":
        """The cache as it stands now, unchanged by later appends (which replace tensors, never write into them)."""
        view = KVCache(self.cfg, len(self.k))
        view.k, view.v, view.x, view.frames, view.next_frame = list(self.k), list(self.v), self.x, list(self.frames), \
            self.next_frame
        view.slow, view.last_left, view.promoted, view.left = list(self.slow), self.last_left, self.promoted, self.left
        view.sims = list(self.sims)
        view.sink_from = self.sink_from
        return view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.k, *self.v, self.x] if t is not None)
