"""A reward for `preftune sample --reward examples/reward.py:score` (and `preftune eval`): a toy that
fits examples/data (advice questions). Write yours with the same signature: the prompts (the last
user turn's text) and one completion each in, one finite float per completion out; higher is better.

Anything goes inside: rules, a classifier, a call to a judge model. A sequence-classification reward
model (a hub id or folder) can be given as --reward instead of a file."""

HELPFUL = ("practice", "goal", "teacher", "steps", "basics", "feedback", "improve", "progress", "happy to help")
DISMISSIVE = ("give up", "waste of time", "don't bother", "who cares", "not my problem", "no idea", "ugh")


def score(prompts: list[str], completions: list[str]) -> list[float]:
    """+1 per helpful phrase, -1 per dismissive one (the prompt is not read here; yours may)."""
    return [float(sum(p in c.lower() for p in HELPFUL) - sum(p in c.lower() for p in DISMISSIVE)) for c in completions]
