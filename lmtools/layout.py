"""Names shared by everything that writes or reads a prepared folder.

`prepare` writes these files; `train`, `inspect`, `sample` and the tokenizer code read them.
One definition here keeps the writer and the readers from drifting apart.
"""

# The end-of-text token: the document separator of text corpora, and the id after every document.
EOT = "<|endoftext|>"

TRAIN_FILE = "train.npy"
VAL_FILE = "val.npy"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
# Held (flock) by the one `prepare` writing the folder; the kernel releases it if that process dies.
LOCK_FILE = ".prepare.lock"
