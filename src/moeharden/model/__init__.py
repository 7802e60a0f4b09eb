"""The MoE model: the one registry of family knowledge (where the experts, routers and attention
projections are, on disk and in memory), checkpoint resolution and loading, routing records and
expert masks on a loaded model, and keep-set files. Imports :mod:`moeharden.io` only.
"""
