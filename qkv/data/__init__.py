"""Data: strict readers, tokenizers, batching and fetching, shared by every model family.

``text`` reads lines and TSV tables; ``parallel`` reads aligned translation pairs;
``tokenizer`` wraps HF ``tokenizers`` BPE and a character vocabulary; ``batching`` groups
examples by token count and pads them; ``fetch`` downloads public sets such as Multi30k.
Every reader validates eagerly, so bad input fails before training starts.
"""
