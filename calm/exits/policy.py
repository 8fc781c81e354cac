"""Exit policies: which layers may exit, by which confidence measure, at which threshold.

Layers are numbered 1..L: exiting "at layer k" means the token is predicted from the
hidden state after k decoder layers; exiting at L is the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calm.errors import PolicyError

MEASURES = ("softmax", "state", "classifier", "fixed")


@dataclass(frozen=True)
class ExitPolicy:
    """When a token may leave the layer stack.

    measure: "softmax" (top-1 minus top-2 probability), "state" (cosine similarity of the
        hidden state with the previous layer's), "classifier" (learned exit classifier), or
        "fixed" (every token exits at the first allowed layer; for benchmarks and ablations).
    threshold: λ in [0, 1]; a token exits when its confidence reaches λ(t). λ >= 1 never exits, under any
        decay (the full model).
    exit_layers: layers allowed to exit (1..L-1); None means every layer from min_exit_layer.
    min_exit_layer: no exit below this layer. None: the model's exit floor (calm.engine.decode.exit_floor: the first
        layer with a trained exit head, or half the depth without heads); a value below the floor is refused.
    decay_tau: τ of CALM's schedule λ(t) = 0.9·λ + 0.1·λ·exp(−τ·t/N), which lowers λ over the output from λ
        at the first token to about 0.9·λ at the last (earlier exits late in the output); 0 keeps λ fixed.
    """

    measure: str = "softmax"
    threshold: float = 2.0
    exit_layers: tuple[int, ...] | None = None
    min_exit_layer: int | None = None
    decay_tau: float = 4.0

    def __post_init__(self) -> None:
        if self.measure not in MEASURES:
            raise PolicyError(f"unknown confidence measure {self.measure!r}; choose one of {', '.join(MEASURES)}")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold) or self.threshold < 0:
            raise PolicyError(f"threshold must be a number >= 0 (1 and above never exit), got {self.threshold!r}")
        if self.min_exit_layer is not None and self.min_exit_layer < 1:
            raise PolicyError(f"min_exit_layer must be >= 1, got {self.min_exit_layer}")
        if self.decay_tau < 0 or math.isnan(self.decay_tau):
            raise PolicyError(f"decay_tau must be >= 0, got {self.decay_tau}")
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(sorted(set(int(k) for k in self.exit_layers))))

    @classmethod
    def never(cls) -> ExitPolicy:
        """The full model: no token exits early."""
        return cls(measure="softmax", threshold=2.0, exit_layers=())

    @classmethod
    def fixed(cls, layer: int) -> ExitPolicy:
        """Every token exits at `layer` (an oracle-free static exit, for ablations and benchmarks)."""
        return cls(measure="fixed", threshold=0.0, exit_layers=(layer,))

    @property
    def never_exits(self) -> bool:
        return self.threshold >= 1.0 or self.exit_layers == ()

    def describe(self) -> str:
        """What generating under this policy is, for a result or a footer: 'full model (exact)' or the
        early exit it runs."""
        if self.never_exits:
            return "full model (exact)"
        if self.measure == "fixed":
            where = f"layer {min(self.exit_layers)}" if self.exit_layers else "the first allowed layer"
            return f"early exit (approximate): every token at {where}"
        return f"early exit (approximate): {self.measure} λ={self.threshold:g}, decay τ={self.decay_tau:g}"

    def allowed_layers(self, num_layers: int, floor: int = 1) -> tuple[int, ...]:
        """The layers (1..num_layers-1) at which a token may exit under this policy; `floor` is the model's
        lowest exit layer, which min_exit_layer=None stands for (an explicit one below it is refused)."""
        if self.never_exits:
            return ()
        candidates = self.exit_layers if self.exit_layers is not None else range(1, num_layers)
        for k in candidates:
            if not 1 <= k < num_layers:
                raise PolicyError(
                    f"exit layer {k} is out of range: this model has {num_layers} layers, "
                    f"so exits are allowed at layers 1..{num_layers - 1}"
                )
        # an explicit layer list (fixed exits, speculative drafts) is taken as given; the floor guards measures
        lowest = (floor if self.exit_layers is None else 1) if self.min_exit_layer is None else self.min_exit_layer
        if self.exit_layers is None:
            if lowest < floor:
                raise PolicyError(
                    f"--min-exit-layer {lowest} is below layer {floor}, this model's lowest exit layer "
                    f"(below it no exit head is trained); give --min-exit-layer {floor} or more"
                )
            if lowest >= num_layers:
                raise PolicyError(f"min_exit_layer {lowest} leaves no exit layer in a {num_layers}-layer model")
        return tuple(k for k in candidates if k >= lowest)

    def threshold_at(self, step: int, max_new_tokens: int) -> float:
        """CALM's decaying threshold λ(t) for the t-th generated token (t from 0)."""
        if self.decay_tau == 0 or max_new_tokens <= 0:
            return float(self.threshold)
        decay = math.exp(-self.decay_tau * step / max_new_tokens)
        return 0.9 * self.threshold + 0.1 * self.threshold * decay
