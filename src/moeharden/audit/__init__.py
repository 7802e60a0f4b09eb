"""Judging a checkpoint: typed report documents, ``scan`` (attack a model and measure), integrity
and re-attack in ``verify``, the release gate, and the Markdown/HTML reports with their plots.
Sits above attack and defend; below the demo and the CLI.
"""
