"""Synthetic prose for the offline lm-eval tasks: varied sentences, so next-sentence choices are distinct."""

import random

from darwinlm.core.data.sources import Document

WORDS = ("river mountain council harbor farmer letter winter budget soldier garden school nation worker engine "
         "promise market village captain whale ocean law doctor family future bridge").split()
VERBS = "builds guards answers follows carries remembers watches opens crosses visits".split()


def synthetic_document(rng: random.Random, index: int, paragraphs: int = 6) -> Document:
    """Prose-shaped text: paragraphs of 6-9 short, varied sentences, blank lines between paragraphs."""
    def sentence() -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        return f"The {words[0]} {rng.choice(VERBS)} {' '.join(words[1:])} near the {rng.choice(WORDS)}."
    text = "\n\n".join(" ".join(sentence() for _ in range(rng.randint(6, 9))) for _ in range(paragraphs))
    return Document(f"doc_{index:02d}.txt", text)
