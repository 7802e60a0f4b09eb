"""What a releaser does about it: entangled expert training (recipe, losses, keep-set pools,
training loop), the selective fine-tuning policy, tensor manifests and expert fingerprints,
signing, and locking a release. May use :mod:`moeharden.attack` (the defense trains against the
attack); never :mod:`moeharden.audit`.
"""
