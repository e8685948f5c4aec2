"""``medsegx-pretrain``: ConMoAE-SAM pretraining on the MedSegDB ID/train tree.

Paper recipe by default (vit_b at 256, AdamW 1e-3 / wd 0.01, 30 epochs, global batch 1024,
Dice + BCE min over 3 masks, box jitter 0..19 px, warmup 5 epochs + cosine to 1e-6)::

    torchrun --nproc_per_node 8 -m medsegx_training.pretrain \\
        --data-root /data/MedSegDB/train --sam-checkpoint sam_vit_b_01ec64.pth --output-dir runs/pretrain

One GPU keeps the global batch (128 per step x 8 accumulation steps); ``--backbone lite``
needs no SAM file.
"""

from __future__ import annotations

import sys

from medsegx_training.trainer import main_for_stage


def main(argv: list[str] | None = None) -> int:
    return main_for_stage("pretrain", argv)


if __name__ == "__main__":
    sys.exit(main())
