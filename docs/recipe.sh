#!/usr/bin/env bash
# The five files composed through manifests, the way a data team would chain them (docs/recipe.md):
#   alt-text --Altogether--> re-aligned caption --CapsFusion fuser (+ synthetic caption)--> fused caption
#   --VeCLIP mixed training--> a CLIP --quality-caption probes--> dense transfer
#                                      \--DiCO reward--> a fine-tuned captioner
# In miniature it reuses the captioner, the fuser and the XE captioner that `python reproduce.py`
# trained (results/<paper>/seed0/...); point the variables below elsewhere for a real run, where
# every stage's command is the same with real models and manifests (see each docs/<paper>.md).
#   bash docs/recipe.sh                 # about 10 minutes on 2 CPU cores after `python reproduce.py`
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/recipe}
RESULTS=${RESULTS:-results}
ALTOGETHER=${ALTOGETHER:-$RESULTS/altogether/seed0/finetune.pt}   # the re-aligning captioner
FUSER=${FUSER:-$RESULTS/capsfusion/seed0/fuser}                    # the distilled CapsFusion fuser
XE=${XE:-$RESULTS/dico/seed0/xe/best.pt}                           # the XE captioner DiCO starts from
for needed in "$ALTOGETHER" "$FUSER" "$XE"; do
  [ -e "$needed" ] || { echo "recipe: $needed is missing; run 'python reproduce.py' first" >&2; exit 1; }
done
mkdir -p "$OUT"

# 0. The data as manifests + PNGs (a real team: webdataset shards or a crawl turned into manifests).
python -m common.miniature --out "$OUT/world"

# 1. Altogether re-aligns each image's alt-text with the image: new field `altogether`.
for split in train test; do
  python altogether.py caption --checkpoint "$ALTOGETHER" --data "$OUT/world/$split.jsonl" \
      --out "$OUT/$split.altogether.jsonl"
done

python altogether.py eval --data "$OUT/test.altogether.jsonl" --out "$OUT/altogether_eval.json" \
    --score-model miniature

# 2. The CapsFusion fuser merges the re-aligned caption (its "raw" sentence) with the synthetic caption: `capsfus`.
for split in train test; do
  python capsfusion.py fuse --llm "$FUSER" --data "$OUT/$split.altogether.jsonl" \
      --out "$OUT/$split.capsfus.jsonl" --raw-field altogether --synthetic-field synthetic_caption --out-field capsfus
done
python capsfusion.py eval --data "$OUT/test.capsfus.jsonl" --out "$OUT/fusion_eval" --out-field capsfus

# 3. VeCLIP-style mixed training on alt-text and the chained caption (p = 0.5), evaluated on the test split.
python veclip.py train --data "$OUT/train.capsfus.jsonl" --llm-vec-field capsfus \
    --eval-data "$OUT/world/test.jsonl" --out "$OUT/veclip"

# 4. The quality-caption probes on that CLIP's image encoder (and an untrained one as the floor).
python clip_quality.py probe --checkpoints "$OUT/veclip/checkpoint.pt" random --out "$OUT/probe"

# 5. DiCO fine-tunes the XE captioner with the chained CLIP as its reward (PAC-S formula, w = 2);
#    the world's own scorer stays the independent CLIP-S judge of the eval stage.
python dico.py dico --overwrite --init "$XE" --out "$OUT/dico" --pacs-model mini-ViT-8 --pacs-pretrained "$OUT/veclip/checkpoint.pt"
python dico.py eval --checkpoints "$XE" "$OUT/dico/dico/last.pt" --out "$OUT/dico" \
    --pacs-model mini-ViT-8 --pacs-pretrained "$OUT/veclip/checkpoint.pt"
echo "recipe: every step's output is under $OUT (see docs/recipe.md for what each adds)"
