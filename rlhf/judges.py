"""Gold judges for `eval.judge`: scorers the policy was not trained on, called as judge(prompt, response).

`load_judge` imports the configured `package.module:function` (at `rlhf validate` and `rlhf eval`),
`judge_scores` calls it on every response and turns a failing judge into one UserError line.

`reading_ease` is the Flesch reading-ease score of `textstat` (pip install textstat; the `judges`
extra): 206.835 − 1.015·(words per sentence) − 84.6·(syllables per word), higher = plainer
English (60–70 is plain, below 30 is hard; a very short sentence of one-syllable words scores
above 100). It labels the preferences of the `readability` demo task (data/build_readability.py)
and judges that task's PPO policy (configs/readability.yaml).
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Any, Callable, Sequence

from rlhf.errors import UserError


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


def load_judge(spec: str) -> Callable[[Any, str], float]:
    """Import `package.module:function` (eval.judge); UserError if it cannot be imported or called."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"eval.judge {spec!r}: cannot import module '{module_name}' ({type(e).__name__}: {e}); "
                        "make it importable (install it, or add its folder to PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"eval.judge {spec!r}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"eval.judge {spec!r}: '{attr}' is not a function (a {type(fn).__name__})")
    return fn


def judge_scores(judge: Callable, spec: str, prompts: Sequence[Any], responses: Sequence[str], which: str,
                 indices: Sequence[int] | None = None) -> list[float]:
    """judge(prompt, response) for each pair, as floats. A judge that raises, or returns anything but
    a finite number, is a UserError naming the judge, the held-out prompt's index and `which` side."""
    import torch  # a judge may return a one-element tensor; imported here so `rlhf validate` stays light

    out = []
    for k, (p, r) in enumerate(zip(prompts, responses)):
        i = indices[k] if indices is not None else k
        try:
            value = judge(p, r)
        except Exception as e:  # noqa: BLE001 - the judge is user code: report, do not crash
            raise UserError(f"eval.judge {spec!r} raised {type(e).__name__}: {e} on held-out prompt {i} "
                            f"({which} response); fix the judge or set eval.judge: null") from None
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise UserError(f"eval.judge {spec!r} returned {value!r} ({type(value).__name__}) for held-out prompt {i} "
                            f"({which} response); it must return a finite number")
        out.append(float(value))
    return out
