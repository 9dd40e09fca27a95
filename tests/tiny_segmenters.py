"""Tiny random SAM2 (image and video) and Grounding DINO models, built from transformers configs and saved with
`save_pretrained` into a folder, as the real ones are downloaded (shared by tests/test_segment.py and
tests/test_label.py). Random weights: they pin wiring, never quality."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from transformers import (
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    Sam2Config,
    Sam2Model,
    Sam2VideoConfig,
    Sam2VideoModel,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?"]


def _vision(size: int) -> dict:
    return {"model_type": "sam2_vision_model", "backbone_channel_list": [64, 32, 16, 8],
            "backbone_feature_sizes": [[size // 4] * 2, [size // 8] * 2, [size // 16] * 2],
            "backbone_config": {"model_type": "sam2_hiera_det_model", "image_size": [size, size], "hidden_size": 8,
                                "num_attention_heads": 1, "blocks_per_stage": [1, 1, 2, 1],
                                "embed_dim_per_stage": [8, 16, 32, 64], "num_attention_heads_per_stage": [1] * 4,
                                "window_size_per_stage": [4] * 4, "global_attention_blocks": [3],
                                "window_positional_embedding_background_size": [4, 4]}}


def _preprocessor(path: str, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"height": size, "width": size}, "image_mean": list(mean), "image_std": list(std)}, f)


def save_sam2(path: str, *, size: int = 64, mean: Sequence[float] = (0.485, 0.456, 0.406),
              std: Sequence[float] = (0.229, 0.224, 0.225), seed: int = 0) -> str:
    """A `Sam2Model` taking `size x size` images (hidden width 32)."""
    vision = {**_vision(size), "fpn_hidden_size": 32}
    config = Sam2Config(vision_config=vision, prompt_encoder_config={"hidden_size": 32, "image_size": size,
                                                                     "patch_size": 16},
                        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2,
                                             "iou_head_hidden_dim": 32})
    torch.manual_seed(seed)
    Sam2Model(config).eval().save_pretrained(path)
    _preprocessor(path, size, mean, std)
    return path


def save_sam2_video(path: str, *, size: int = 64, seed: int = 0) -> str:
    """A `Sam2VideoModel` taking `size x size` frames. The memory path needs a hidden width that is a multiple of
    the memory width 64 above it (object pointers are split into memory-width tokens): 128."""
    vision = {**_vision(size), "fpn_hidden_size": 128}
    config = Sam2VideoConfig(
        vision_config=vision, prompt_encoder_config={"hidden_size": 128, "image_size": size, "patch_size": 16},
        mask_decoder_config={"hidden_size": 128, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
        image_size=size, num_maskmem=3, memory_attention_hidden_size=128, memory_attention_num_layers=1,
        memory_attention_feed_forward_hidden_size=64, memory_attention_rope_feat_sizes=[size // 16, size // 16],
        memory_encoder_hidden_size=128, memory_encoder_output_channels=64, mask_downsampler_embed_dim=128,
        memory_fuser_embed_dim=128, memory_fuser_intermediate_dim=64, max_object_pointers_in_encoder=4)
    torch.manual_seed(seed)
    Sam2VideoModel(config).eval().save_pretrained(path)
    _preprocessor(path, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return path


def save_grounding_dino(path: str, words: Sequence[str], *, seed: int = 1) -> str:
    """A `GroundingDinoForObjectDetection` with its processor (PIL image backend; a BERT word-level vocabulary of
    `words` plus the special tokens)."""
    vocab = SPECIAL + [w for w in dict.fromkeys(words) if w not in SPECIAL]
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", "image_size": 64, "patch_size": 4, "embed_dim": 8,
                         "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2, "out_indices": [2, 3, 4]},
        text_config={"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 64},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=12, max_text_len=32, encoder_n_points=2,
        decoder_n_points=2, disable_custom_kernels=True)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(path)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(size={"shortest_edge": 64,
                                                                                "longest_edge": 96}),
                           tokenizer=BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})).save_pretrained(path)
    return path
