#!/usr/bin/env bash
# Makes every picture and page in docs/attention/ from trained runs (README.md there says which runs).
# Run from the repository root: bash docs/attention/make.sh
set -euo pipefail
export OMP_NUM_THREADS=1
qkv=".venv/bin/qkv"
out=docs/attention

# The digit for the ViT pictures: the first test image of the run's own split (never seen in training).
.venv/bin/python - <<'PY'
import json
import numpy as np
from PIL import Image
from qkv.data.images import load_mnist5k
x, y = load_mnist5k()
i = json.load(open("runs/mnist-vit/split.json"))["test"][0]
Image.fromarray((x[i] * 255).round().astype(np.uint8)).save("docs/attention/digit.png")
print(f"digit.png: test image {i}, label {y[i]}")
PY

# Translation (Transformer, encoder-decoder): source-target alignment = cross-attention.
de="Ein Mann mit einem roten Hut spielt Gitarre auf der Straße."
$qkv attention runs/multi30k-de-en --text "$de" --out $out/translation-de-en-alignment.png
$qkv attention runs/multi30k-de-en --text "$de" --head 1 --out $out/translation-de-en-alignment-head1.png
$qkv attention runs/multi30k-de-en --text "$de" --kind encoder --out $out/translation-de-en-encoder.png
$qkv attention runs/multi30k-de-en --text "$de" --kind decoder --out $out/translation-de-en-decoder.png
$qkv attention runs/multi30k-de-en --text "$de" --out $out/translation-de-en.html
$qkv attention runs/multi30k-en-de --text "Two dogs are running through the snow." --out $out/translation-en-de-alignment.png

# Language model (GPT, decoder-only, character level): causal self-attention.
lm=$'ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.'
$qkv attention runs/shakespeare-char-tiny --text "$lm" --out $out/lm-shakespeare.png
$qkv attention runs/shakespeare-char-tiny --text "$lm" --layer 3 --head 0 --out $out/lm-shakespeare-head0.png
$qkv attention runs/shakespeare-char-tiny --text "$lm" --out $out/lm-shakespeare.html

# Classification (BERT-style encoder, MiniLM fine-tuned on SST-2): bidirectional self-attention.
review="the acting is superb, but the plot is a tired mess."
$qkv attention runs/sst2-minilm-600 --text "$review" --out $out/classification-sst2.png
$qkv attention runs/sst2-minilm-600 --text "$review" --layer 0 --head 3 --out $out/classification-sst2-layer0-head3.png
$qkv attention runs/sst2-minilm-600 --text "$review" --out $out/classification-sst2.html

# ViT on MNIST: class-token maps per layer and rollout (qkv.viz_image), and the page over the patches.
$qkv attention runs/mnist-vit --image $out/digit.png --out $out/vit-mnist.png
$qkv attention runs/mnist-vit --image $out/digit.png --out $out/vit-mnist.html

# Training curves from metrics.jsonl.
$qkv plot runs/multi30k-de-en --out $out/curves-multi30k-de-en.png
$qkv plot runs/sst2-minilm-600 --out $out/curves-sst2-minilm.png
$qkv plot runs/shakespeare-char-tiny --out $out/curves-shakespeare-char-tiny.png
