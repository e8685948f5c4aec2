"""``medsegx-finetune``: fine-tune a pretrained MedSegX checkpoint on an OOD / real-world task.

Paper recipe by default: lr 5e-5, same loss and box jitter, 30 epochs, from the pretrained
checkpoint, on one of the 5 / 15 / 25 / 50 / 100 % fine-tune splits::

    medsegx-finetune --data-root /data/MedSegDB/ood --shift cross_site --task CT_Liver --percent 25 \\
        --checkpoint runs/pretrain/medsegx_vit_b.pth --sam-checkpoint sam_vit_b_01ec64.pth \\
        --output-dir runs/ft_liver_25
"""

from __future__ import annotations

import sys

from medsegx_training.trainer import main_for_stage


def main(argv: list[str] | None = None) -> int:
    return main_for_stage("finetune", argv)


if __name__ == "__main__":
    sys.exit(main())
