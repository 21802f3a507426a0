"""Small Hugging Face transformers models, built from configs written here (no hub access).

Each is the library's own model class at a small size (width 64, 2 layers, 4 heads) with
random weights, eager attention (the hand-written softmax attention a pass may rewrite) and no
cache, wrapped so that it takes one tensor and returns one: ``hf:NAME`` in `fxopt.models`.
transformers is imported only when a model is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

VOCAB = 1000
TOKENS = (32,)
IMAGE = (3, 224, 224)
MEL = (80, 200)  # 80 log-mel bins x 200 frames: what max_source_positions=100 expects
# Shared by every config; token ids inside the vocabulary keep transformers from warning.
_SMALL = {"attn_implementation": "eager", "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
_LAYERS = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


class FirstOutput(nn.Module):
    """Calls a transformers model with one tensor as `argument` and returns its first output
    (last hidden state or logits) as a plain tensor."""

    def __init__(self, model: nn.Module, argument: str) -> None:
        super().__init__()
        self.model = model
        self.argument = argument

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.argument: x}, return_dict=False)[0]


@dataclass(frozen=True)
class HfModel:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    vocab: int | None  # token ids in [0, vocab), or None for float inputs
    description: str


def _transformers():
    return importlib.import_module("transformers")


def _bert() -> nn.Module:
    t = _transformers()
    config = t.BertConfig(vocab_size=VOCAB, intermediate_size=128, **_LAYERS, **_SMALL)
    return FirstOutput(t.BertModel(config, add_pooling_layer=False), "input_ids")


def _distilbert() -> nn.Module:
    t = _transformers()
    config = t.DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, hidden_dim=128, **_SMALL
    )
    return FirstOutput(t.DistilBertModel(config), "input_ids")


def _gpt2() -> nn.Module:
    t = _transformers()
    config = t.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, use_cache=False, **_SMALL
    )
    return FirstOutput(t.GPT2LMHeadModel(config), "input_ids")


def _llama() -> nn.Module:
    t = _transformers()
    config = t.LlamaConfig(
        vocab_size=VOCAB,
        intermediate_size=128,
        num_key_value_heads=2,
        use_cache=False,
        **_LAYERS,
        **_SMALL,
    )
    return FirstOutput(t.LlamaForCausalLM(config), "input_ids")


def _t5_encoder() -> nn.Module:
    t = _transformers()
    config = t.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, **_SMALL
    )
    return FirstOutput(t.T5EncoderModel(config), "input_ids")


def _vit() -> nn.Module:
    t = _transformers()
    config = t.ViTConfig(
        image_size=224, patch_size=16, intermediate_size=128, num_labels=10, **_LAYERS, **_SMALL
    )
    return FirstOutput(t.ViTForImageClassification(config), "pixel_values")


def _clip_vision() -> nn.Module:
    t = _transformers()
    config = t.CLIPVisionConfig(
        image_size=224, patch_size=32, intermediate_size=128, **_LAYERS, **_SMALL
    )
    return FirstOutput(t.CLIPVisionModel(config), "pixel_values")


def _whisper_encoder() -> nn.Module:
    t = _transformers()
    whisper = importlib.import_module("transformers.models.whisper.modeling_whisper")
    config = t.WhisperConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        num_mel_bins=MEL[0],
        max_source_positions=MEL[1] // 2,
        decoder_start_token_id=0,
        **_SMALL,
    )
    return FirstOutput(whisper.WhisperEncoder(config), "input_features")


MODELS = {
    "bert": HfModel(_bert, TOKENS, VOCAB, "BertModel: last hidden state"),
    "distilbert": HfModel(_distilbert, TOKENS, VOCAB, "DistilBertModel: last hidden state"),
    "gpt2": HfModel(_gpt2, TOKENS, VOCAB, "GPT2LMHeadModel: logits"),
    "llama": HfModel(_llama, TOKENS, VOCAB, "LlamaForCausalLM (grouped-query): logits"),
    "t5_encoder": HfModel(_t5_encoder, TOKENS, VOCAB, "T5EncoderModel: last hidden state"),
    "vit": HfModel(_vit, IMAGE, None, "ViTForImageClassification: logits"),
    "clip_vision": HfModel(_clip_vision, IMAGE, None, "CLIPVisionModel: last hidden state"),
    "whisper_encoder": HfModel(
        _whisper_encoder, MEL, None, "WhisperEncoder on log-mel features: last hidden state"
    ),
}
