"""Recurrent encoder-decoders: the baselines self-attention replaced.

Encoder: token embedding -> bidirectional GRU or LSTM, d_hidden/2 units per direction, so the
memory (B, S, H) has the decoder's width H = d_hidden (as OpenNMT's "brnn"). Decoder: GRU or
LSTM of width H, initialised from the encoder's last states, with one of four ways to see the
source:

- ``none``: Cho et al. 2014 / Sutskever et al. 2014. The context is one fixed vector, the
  encoder's last states c = [h_fwd(last token); h_bwd(first token)], fed to every decoder step.
- ``additive``: Bahdanau et al. 2015, eq. 6: e_tj = v_a^T tanh(W_a s + U_a h_j).
- ``dot`` / ``general``: Luong et al. 2015, sec. 3.1: e_tj = s_t . h_j or s_t^T W_a h_j.
- ``scaled_dot``: Vaswani et al. 2017, Eq. 1: e_tj = s_t . h_j / sqrt(H) (the Transformer's score).

The scores are the pure functions of qkv.attention. Where the query comes from is a separate
choice, ``feed_context``:

- False (default, Luong's placement without input feeding): s_t = RNN(y_{t-1}, s_{t-1}) first,
  then c_t = attend(s_t). The RNN never reads c_t, so training runs all target positions in one
  call of the fused RNN kernel and one batched attention (several times faster on a CPU).
- True (Bahdanau's placement): c_t = attend(s_{t-1}), s_t = RNN([y_{t-1}; c_t], s_{t-1}), a
  Python loop over target positions.

Both predict from Luong's attentional state (eq. 5): o_t = tanh(W_c [s_t; c_t]),
p(y_t) = softmax(W_out o_t), with o_t of width d_embed so W_out can share the target embedding.

The decoding interface is the Transformer's (``encode``, ``decode``, ``new_cache``, the special
ids, ``max_source_len`` / ``max_target_len``), so qkv.decode's greedy and beam search work
unchanged; the "cache" is the recurrent state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from qkv.attention import additive_attention, multiplicative_attention, scaled_dot_product_attention
from qkv.blocks import layer_groups
from qkv.config import check_ranges, ranged
from qkv.masks import check_token_ids, padding_mask
from qkv.record import AttentionRecord, layer_records

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
ATTENTIONS = ("none", "additive", "dot", "general", "scaled_dot")


@dataclass(frozen=True)
class RNNSeq2SeqConfig:
    """Vocabulary sizes and ids are filled in from the tokenizers by the task."""

    src_vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    tgt_vocab_size: int = ranged(0, ge=0, note="0 = from the tokenizer")
    cell: str = "gru"                # "gru" or "lstm"
    attention: str = "additive"      # "none", "additive" (Bahdanau), "dot", "general" (Luong), "scaled_dot"
    feed_context: bool = False       # Bahdanau's placement: attend with s_{t-1}, feed c_t into the RNN
    d_embed: int = ranged(256, ge=1)
    d_hidden: int = ranged(512, ge=2)  # decoder width; the encoder has d_hidden/2 per direction
    d_attention: int = ranged(0, ge=0, note="0 = d_hidden")  # additive attention's hidden size A
    n_encoder_layers: int = ranged(1, ge=1)
    n_decoder_layers: int = ranged(1, ge=1)
    dropout: float = ranged(0.2, ge=0.0, lt=1.0)
    share_embeddings: bool = False   # one embedding for both sides (needs a joint vocabulary)
    tie_output: bool = False         # W_out = the target embedding
    max_len: int = ranged(512, ge=1)  # unread by a recurrent model; qkv.tasks.translation still sets it
    pad_id: int = ranged(0, ge=0)
    bos_id: int = ranged(1, ge=0)
    eos_id: int = ranged(2, ge=0)

    def __post_init__(self):
        check_ranges(self)
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {self.cell!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {self.attention!r}")
        if self.d_hidden % 2:
            raise ValueError(f"d_hidden={self.d_hidden} must be even (the encoder has d_hidden/2 per direction)")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"share_embeddings needs one joint vocabulary, got src_vocab_size="
                             f"{self.src_vocab_size} and tgt_vocab_size={self.tgt_vocab_size}")


class RecurrentState:
    """The decoder's "cache": its recurrent state (h, or (h, c) for an LSTM), each (L, N, H).

    ``length``: positions decoded so far; ``reorder(index)`` keeps batch rows ``index`` (beam
    search's surviving hypotheses), like ``StackCache.reorder``.
    """

    def __init__(self) -> None:
        self.state = None
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        if self.state is not None:
            self.state = _map_state(self.state, lambda t: t.index_select(1, rows))


def _map_state(state, fn):
    return tuple(fn(t) for t in state) if isinstance(state, tuple) else fn(state)


def _top(state) -> torch.Tensor:
    """The top layer's hidden state (N, H) of an RNN state."""
    h = state[0] if isinstance(state, tuple) else state
    return h[-1]


class RNNSeq2Seq(nn.Module):
    """Bidirectional recurrent encoder + recurrent decoder with optional attention."""

    def __init__(self, cfg: RNNSeq2SeqConfig):
        super().__init__()
        if cfg.src_vocab_size < 1 or cfg.tgt_vocab_size < 1:
            raise ValueError("src_vocab_size and tgt_vocab_size must be set (they come from the tokenizer)")
        self.cfg = cfg
        E, H, L = cfg.d_embed, cfg.d_hidden, cfg.n_decoder_layers
        rnn = CELLS[cfg.cell]
        self.src_embed = nn.Embedding(cfg.src_vocab_size, E, padding_idx=cfg.pad_id)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else nn.Embedding(cfg.tgt_vocab_size, E, padding_idx=cfg.pad_id))
        self.drop = nn.Dropout(cfg.dropout)
        inner = cfg.dropout if cfg.n_encoder_layers > 1 else 0.0
        self.encoder = rnn(E, H // 2, num_layers=cfg.n_encoder_layers, batch_first=True, bidirectional=True,
                           dropout=inner)
        self.bridge = nn.Linear(H, L * H)  # s_0 = tanh(W_init [h_fwd; h_bwd]) per decoder layer
        context_in = H if (cfg.attention == "none" or cfg.feed_context) else 0
        self.decoder = rnn(E + context_in, H, num_layers=L, batch_first=True,
                           dropout=cfg.dropout if L > 1 else 0.0)
        if cfg.attention == "general":
            self.w_a = nn.Parameter(torch.empty(H, H))
        if cfg.attention == "additive":
            A = cfg.d_attention or H
            self.w_q, self.w_k = nn.Parameter(torch.empty(A, H)), nn.Parameter(torch.empty(A, H))
            self.v_a = nn.Parameter(torch.empty(A))
        self.combine = nn.Linear(2 * H, E, bias=False)  # Luong eq. 5: o_t = tanh(W_c [s_t; c_t])
        self.output = nn.Linear(E, cfg.tgt_vocab_size, bias=False)
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight
        self._init_attention()

    def _init_attention(self) -> None:
        for name in ("w_a", "w_q", "w_k"):
            if hasattr(self, name):
                nn.init.xavier_uniform_(getattr(self, name))
        if hasattr(self, "v_a"):
            nn.init.uniform_(self.v_a, -self.v_a.shape[0] ** -0.5, self.v_a.shape[0] ** -0.5)

    # -- the decoding interface (qkv.decode's Seq2Seq) ------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.cfg.pad_id

    @property
    def bos_id(self) -> int:
        return self.cfg.bos_id

    @property
    def eos_id(self) -> int:
        return self.cfg.eos_id

    @property
    def max_source_len(self) -> int | None:
        """None: recurrence carries order, no position table caps the source."""
        return None

    @property
    def max_target_len(self) -> int | None:
        """None: no position table caps the target either."""
        return None

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Embeddings; each encoder layer (both directions); each decoder layer (the first with the
        bridge that starts it); the attention, the combination W_c and the output projection."""
        enc = [self.encoder.all_weights[2 * i: 2 * i + 2] for i in range(self.cfg.n_encoder_layers)]
        dec = [self.decoder.all_weights[i] for i in range(self.cfg.n_decoder_layers)]
        layers = [nn.ParameterList(p for direction in layer for p in direction) for layer in enc]
        layers += [nn.ParameterList([*self.bridge.parameters(), *dec[0]]) if i == 0 else nn.ParameterList(dec[i])
                   for i in range(len(dec))]
        return layer_groups(self, [self.src_embed, self.tgt_embed], layers)

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, *, record: AttentionRecord | None = None):
        """src (B, S) ids -> memory (B, S, H) (zeros at padding), src_mask (B, 1, 1, S).

        ``record`` is accepted for the Seq2Seq interface: a recurrent encoder has no attention.
        """
        if src.dim() != 2:
            raise ValueError(f"src must have shape (B, S), got {tuple(src.shape)}")
        check_token_ids(src, self.cfg.src_vocab_size, name="src")
        src_mask = padding_mask(src, self.cfg.pad_id)  # (B, 1, 1, S)
        lengths = src_mask[:, 0, 0].sum(dim=1).clamp(min=1).cpu()  # (B,)
        x = self.drop(self.src_embed(src))  # (B, S, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])  # (B, S, H)
        return self.drop(memory), src_mask

    def summary(self, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """The fixed-size context: [forward state at the last token; backward state at the first], (B, H)."""
        half = self.cfg.d_hidden // 2
        last = src_mask[:, 0, 0].sum(dim=1).clamp(min=1) - 1  # (B,)
        forward = memory[torch.arange(memory.shape[0], device=memory.device), last, :half]  # (B, H/2)
        return torch.cat([forward, memory[:, 0, half:]], dim=-1)  # (B, H)

    def initial_state(self, memory: torch.Tensor, src_mask: torch.Tensor):
        """s_0 = tanh(W_init c) for every decoder layer (L, B, H); an LSTM's cells start at zero."""
        B, L, H = memory.shape[0], self.cfg.n_decoder_layers, self.cfg.d_hidden
        h = torch.tanh(self.bridge(self.summary(memory, src_mask)))  # (B, L*H)
        h = h.view(B, L, H).transpose(0, 1).contiguous()  # (L, B, H)
        return (h, torch.zeros_like(h)) if self.cfg.cell == "lstm" else h

    # -- attention -------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor):
        """query (B, T, H), memory (B, S, H) -> context (B, T, H), weights (B, T, S)."""
        mask = src_mask[:, 0]  # (B, 1, S)
        kind = self.cfg.attention
        if kind == "additive":
            return additive_attention(query, memory, memory, w_q=self.w_q, w_k=self.w_k, v_a=self.v_a, mask=mask,
                                      return_weights=True)
        if kind == "scaled_dot":  # one head: (B, 1, T, H) against (B, 1, S, H)
            out, weights = scaled_dot_product_attention(query[:, None], memory[:, None], memory[:, None],
                                                        mask=src_mask, return_weights=True)
            return out[:, 0], weights[:, 0]  # (B, T, H), (B, T, S)
        weight = self.w_a if kind == "general" else None
        return multiplicative_attention(query, memory, memory, weight=weight, mask=mask, return_weights=True)

    # -- decoder ---------------------------------------------------------------------------
    def new_cache(self) -> RecurrentState:
        """The decoder's recurrent state, empty until the first ``decode``."""
        return RecurrentState()

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor, *,
               cache: RecurrentState | None = None, record: AttentionRecord | None = None) -> torch.Tensor:
        """tgt (B, T) ids (starting with BOS) -> logits (B, T, V).

        With ``cache`` only new tokens are passed and the recurrent state carries the rest.
        ``record``: the one attention's weights go to kind "cross", layer 0, as (B, 1, T, S) (one
        head); zeros for ``attention="none"`` (nothing is attended).
        """
        if tgt.dim() != 2:
            raise ValueError(f"tgt must have shape (B, T), got {tuple(tgt.shape)}")
        check_token_ids(tgt, self.cfg.tgt_vocab_size, name="tgt")
        slot = cache
        state = slot.state if slot is not None and slot.state is not None else self.initial_state(memory, src_mask)
        y = self.drop(self.tgt_embed(tgt))  # (B, T, E)
        if self.cfg.attention == "none":
            context = self.summary(memory, src_mask)[:, None].expand(-1, tgt.shape[1], -1)  # (B, T, H)
            s, state = self.decoder(torch.cat([y, context], dim=-1), state)  # (B, T, H)
            weights = memory.new_zeros(tgt.shape[0], tgt.shape[1], memory.shape[1])
        elif self.cfg.feed_context:
            s, context, weights, state = self._decode_loop(y, state, memory, src_mask)
        else:
            s, state = self.decoder(y, state)  # (B, T, H)
            context, weights = self.attend(s, memory, src_mask)  # (B, T, H), (B, T, S)
        if slot is not None:
            slot.state, slot.length = state, slot.length + tgt.shape[1]
        layer = layer_records(record, "decoder", 1)[0]
        if layer is not None:
            layer.put("cross", weights[:, None])  # (B, 1, T, S)
        o = self.drop(torch.tanh(self.combine(torch.cat([s, context], dim=-1))))  # (B, T, E)
        return self.output(o)  # (B, T, V)

    def _decode_loop(self, y, state, memory, src_mask):
        """Bahdanau: c_t = attend(s_{t-1}); s_t = RNN([y_{t-1}; c_t], s_{t-1}), one position at a time."""
        outputs, contexts, weights = [], [], []
        for t in range(y.shape[1]):
            c, w = self.attend(_top(state)[:, None], memory, src_mask)  # (B, 1, H), (B, 1, S)
            s, state = self.decoder(torch.cat([y[:, t : t + 1], c], dim=-1), state)  # (B, 1, H)
            outputs.append(s), contexts.append(c), weights.append(w)
        return torch.cat(outputs, 1), torch.cat(contexts, 1), torch.cat(weights, 1), state

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, *, record: AttentionRecord | None = None) -> torch.Tensor:
        """Teacher forcing: src (B, S), tgt (B, T) -> logits (B, T, V); ``record`` as in ``decode``."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt, memory, src_mask, record=record)
