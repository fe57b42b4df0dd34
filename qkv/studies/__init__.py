"""Studies: commands that train and measure several models and write a Markdown report with plots.

``rnn_vs_attention`` measures why self-attention replaced recurrence; ``attention_variants``
compares attention scores on one task. ``synthetic`` (copy/reverse data, a small training loop
that records gradient norms) and ``plots`` are shared by both.
"""

from pathlib import Path

#: Quick mode's settings show that a study runs, not what it finds: said on stderr and in the report.
QUICK_NOTE = ("quick mode: these settings are too small to conclude from (a few minutes on 2 CPU cores; they can "
              "even reverse a finding); run without --quick for the measurements the committed report shows")


def default_out(name: str) -> Path:
    """Where ``qkv study NAME`` writes without --output: runs/studies/NAME, never the repository's docs."""
    return Path("runs") / "studies" / name
