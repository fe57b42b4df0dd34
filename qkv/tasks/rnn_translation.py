"""Translation with a recurrent encoder-decoder (qkv.models.rnn_seq2seq).

The same data, tokenizers, batches, loss, BLEU and decoding as the ``translation`` task; only
the model section differs (``RNNSeq2SeqConfig``), so it is its own task, ``translation-rnn``,
and each config stays strict. A trained run of either is a ``TranslationRun``: ``qkv translate``
and ``qkv evaluate`` treat both alike.
"""

from __future__ import annotations

from qkv.models.rnn_seq2seq import RNNSeq2Seq, RNNSeq2SeqConfig
from qkv.tasks import TaskSpec, register
from qkv.tasks.translation import TranslationData, TranslationDecode, TranslationRun, TranslationTask, load_tokenizers


class RNNTranslationTask(TranslationTask):
    """TranslationTask with the recurrent model; data, loss and evaluation are inherited."""

    def build_model(self) -> RNNSeq2Seq:
        return RNNSeq2Seq(self.cfg.model)


register(TaskSpec(
    name="translation-rnn",
    data_config=TranslationData,
    model_config=RNNSeq2SeqConfig,
    decode_config=TranslationDecode,
    make_task=RNNTranslationTask,
    build_model=lambda cfg: RNNSeq2Seq(cfg.model),
    load_artifacts=lambda cfg, run_dir: load_tokenizers(run_dir, model=cfg.model),
    inference=TranslationRun,
))
