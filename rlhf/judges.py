"""Gold judges for `eval.judge`: scorers the policy was not trained on, called as judge(prompt, response).

`reading_ease` is the Flesch reading-ease score of `textstat` (pip install textstat; the `judges`
extra): 206.835 − 1.015·(words per sentence) − 84.6·(syllables per word), higher = plainer
English (60–70 is plain, below 30 is hard; a very short sentence of one-syllable words scores
above 100). It labels the preferences of the `readability` demo task (data/build_readability.py)
and judges that task's PPO policy (configs/readability.yaml).
"""

from __future__ import annotations

from typing import Any


def flesch_reading_ease(text: str) -> float:
    """textstat's Flesch reading ease of `text` (0.0 for text with no words)."""
    try:
        import textstat
    except ImportError:
        raise ImportError("the reading_ease judge needs textstat: pip install 'textstat==0.7.8'") from None
    return float(textstat.flesch_reading_ease(text))


def reading_ease(prompt: Any, response: str) -> float:
    """Judge form of flesch_reading_ease: the prompt is ignored, the response is scored."""
    return flesch_reading_ease(response)
