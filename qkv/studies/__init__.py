"""Studies: commands that train and measure several models and write a Markdown report with plots.

``rnn_vs_attention`` measures why self-attention replaced recurrence; ``attention_variants``
compares attention scores on one task. ``synthetic`` (copy/reverse data, a small training loop
that records gradient norms) and ``plots`` are shared by both.
"""
