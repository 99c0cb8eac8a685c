"""Constrained decoding: the model writes, a grammar guarantees the shape.

    from aigckit.constrain import JsonSchema, Regex, Grammar, Choice
    lm.generate(prompt, constraint=JsonSchema(MyPydanticModel), temperature=0)

Constraints are logits processors (``aigckit.text.processors``), so they act in every decoding mode: greedy,
sampling, beam search and the continuous-batching scheduler's rows, each with its own state. See docs/CONSTRAIN.md.
"""

from __future__ import annotations

from aigckit.constrain.constraints import WHITESPACE, Choice, Constraint, Grammar, JsonSchema, Regex, RunLimits

__all__ = ["Constraint", "JsonSchema", "Regex", "Grammar", "Choice", "RunLimits", "WHITESPACE"]
