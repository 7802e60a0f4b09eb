"""The embedded demo: a tiny task-specialised Mixtral MoE trained on CPU (:mod:`.synthetic` tasks,
:mod:`.train` loop), built and cached by :mod:`.build`, and the whole ``moeharden demo`` pipeline on
it (:mod:`.pipeline`). The top layer below the CLI: it may use every other layer.
"""
