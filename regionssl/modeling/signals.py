"""What a pretraining model tells the collapse/stall guard about its losses.

Each model lists, in ``learning_signals()``, the losses it puts in the EventStorage together with
the level a loss sits at when the model cannot tell its positive from its negatives, and the keys
of the diagnostics it logs for the same embeddings. The guard
(:class:`regionssl.engine.hooks.CollapseGuard`) reads only these; it knows no method names.
"""
import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["LearningSignal", "info_nce_chance"]


def info_nce_chance(num_negatives):
    """InfoNCE at chance: ``ln(K + 1)``; every logit equal (e.g. one embedding for all inputs)."""
    return math.log(num_negatives + 1)


@dataclass(frozen=True)
class LearningSignal:
    """One loss the guard watches, and the diagnostics logged for the same embeddings.

    Attributes:
        loss: EventStorage key of the loss as the trainer logs it (e.g. ``"loss_contrast_res4"``).
        chance: the loss, divided by ``weight``, of a model whose scores do not depend on the input:
            ``ln(K + 1)`` for InfoNCE with K negatives, ``ln K_c`` for SwAV's swapped prediction with
            K_c prototypes; None where the rule has no such level (BYOL's regression).
        chance_text: how ``chance`` is made, for messages, e.g. ``"ln(K+1), K = 65536 negatives"``.
        weight: factor the logged loss carries (w_l); the guard compares ``loss / weight`` with chance.
        emb_std: key of the mean per-dimension std of the L2-normalised embeddings (``emb_std``).
        dim: their dimension D; unit vectors spread uniformly have a per-dimension std of 1/sqrt(D).
        pos_sim, neg_sim: keys of the mean cosine similarity to the positive and to the negatives.
        emb_rank: key of the effective number of directions of the embeddings (``embedding_rank``: 1 on one line).
    """

    loss: str
    chance: Optional[float] = None
    chance_text: str = ""
    weight: float = 1.0
    emb_std: Optional[str] = None
    dim: Optional[int] = None
    pos_sim: Optional[str] = None
    neg_sim: Optional[str] = None
    emb_rank: Optional[str] = None
