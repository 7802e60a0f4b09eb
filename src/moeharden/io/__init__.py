"""Bytes on disk and on the Hub: safetensors headers and streamed shards, atomic output
directories (with the marker that says moeharden wrote them) and safe copying of side files, and
uploads to the Hugging Face Hub. Knows nothing of models, tasks or attacks; imports only
:mod:`moeharden.errors`.
"""
