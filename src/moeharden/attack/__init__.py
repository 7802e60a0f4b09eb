"""What a thief does with the weights: attribute experts to a task, sweep keep-sets, physically
prune a checkpoint, and re-align the pruned model on a label budget. Imports downward only
(:mod:`moeharden.model`, :mod:`moeharden.tasks`, :mod:`moeharden.io`).
"""
