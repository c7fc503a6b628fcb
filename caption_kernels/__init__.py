"""Triton kernels with PyTorch references for the project's hot losses.

Each module stands alone (it imports only torch and triton) so it can be copied into another
codebase: `caption_kernels.contrastive` (fused CLIP and SigLIP losses), `caption_kernels.dico` (DiCO's loss).
"""
