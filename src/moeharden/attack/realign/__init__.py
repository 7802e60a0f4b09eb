"""The re-alignment attack: fine-tune a pruned model on a label budget, choosing labels actively.

``run`` holds the settings and the seeded select → train → re-score loop; ``selection`` the
label-selection strategies; ``taskops`` what the loop needs from a task (loss, metric,
uncertainty, embeddings, distillation); ``suite`` the attack over a scan's strongest pruned
models (the ``recovery`` sections of scan.json / verify.json, and their defaults); ``pruned``
the re-alignment of a physically pruned checkpoint (``prune --recover``).
"""
