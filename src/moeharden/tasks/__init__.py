"""Tasks: the task-file schema, data readers and seeded splits, the lm-evaluation-harness bridge,
and the one encoding and scoring module that attribution, evaluation, the attack, the defense and
demo training all use. Knows nothing of MoE; imports :mod:`moeharden.io` only.
"""
