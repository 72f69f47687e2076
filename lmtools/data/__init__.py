"""From text to batches: corpora, tokenizers, `prepare`, token files and the batch loader.

Nothing is imported here: `lmtools prepare` must start without torch (only `loader` needs it).
"""
