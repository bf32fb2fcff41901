"""Text as token ids through a local, fine-tuned BERT (`model.text_encoder: bert`).

The papers drop a text token by replacing its id with [UNK] before a BERT that trains with
the model (spec/missing.md); the loader writes those ids (`Batch.text_bert_observed`).
Zeroing a dropped token's precomputed vector instead (`features`, the default) leaves its
neighbours' contextual vectors, which still encode it. LNLN and HRLF take their BERT here.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from data_pipeline.missing import UNK_TOKEN_ID
from data_pipeline.schema import DataSpec

from .config import ModelConfig

INSTALL_HINT = "pip install '.[bert]'"


def check_config(cfg: ModelConfig) -> None:
    """What can be checked before any data is read (raises ValueError "model.<key>: ...")."""
    if cfg.text_encoder != "bert":
        return
    if not (cfg.bert_path and Path(cfg.bert_path).is_dir()):
        raise ValueError(f"model.bert_path: text_encoder 'bert' needs a local directory of BERT weights "
                         f"(got '{cfg.bert_path}'); weights are never downloaded at run time")
    if importlib.util.find_spec("transformers") is None:  # looked up, not imported (that takes seconds)
        raise ValueError(f"model.text_encoder: 'bert' needs the 'transformers' package ({INSTALL_HINT}); "
                         "or use model.text_encoder: features")


def check_spec(cfg: ModelConfig, spec: DataSpec) -> None:
    if cfg.text_encoder == "bert" and not spec.has_text_bert:
        raise ValueError(f"model.text_encoder: 'bert' needs BERT token ids (text_bert), which dataset "
                         f"'{spec.name}' lacks; use model.text_encoder: features")


def load_bert(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """The BertModel in `cfg.bert_path` (as `save_pretrained` writes it), in fp32 whatever it
    was saved in (the engines cast the whole model). Its parameters are the model's: fine-tuned
    (all but the unused pooler)."""
    check_config(cfg)
    check_spec(cfg, spec)
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per trial and rank would flood the logs
    try:
        bert = BertModel.from_pretrained(cfg.bert_path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.bert_path: no BERT weights loadable from '{cfg.bert_path}' ({exc})") from None
    # Both models read the last hidden state only: the pooler would never get a gradient, and
    # DDP (find_unused_parameters off) waits for one. Frozen, its weights still load and save.
    if bert.pooler is not None:
        bert.pooler.requires_grad_(False)
    c = bert.config
    if c.max_position_embeddings < spec.text_len:
        raise ValueError(f"model.bert_path: this BERT reads at most {c.max_position_embeddings} tokens, dataset "
                         f"'{spec.name}' has {spec.text_len}")
    # The loader writes dropped tokens as id UNK_TOKEN_ID; a vocabulary with [UNK] elsewhere
    # would read them as some other word.
    vocab = Path(cfg.bert_path) / "vocab.txt"
    words = vocab.read_text(encoding="utf-8").splitlines() if vocab.is_file() else None
    if c.vocab_size <= UNK_TOKEN_ID or (words is not None and words[UNK_TOKEN_ID:UNK_TOKEN_ID + 1] != ["[UNK]"]):
        raise ValueError(f"model.bert_path: dropped tokens are written as [UNK] = id {UNK_TOKEN_ID}, which is "
                         f"not [UNK] in the vocabulary of '{cfg.bert_path}'")
    return bert


def bert_features(bert: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B, 3, L) ids / attention mask / token types -> last hidden state (B, L, hidden)."""
    return bert(input_ids=ids[:, 0], attention_mask=ids[:, 1], token_type_ids=ids[:, 2]).last_hidden_state
