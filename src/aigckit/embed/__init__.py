"""Sentence embeddings: our own BERT encoder + sentence-transformers pooling (see `aigckit.embed.bert`)."""

from aigckit.embed.bert import BertConfig, BertModel, Embedder, cosine_matrix, load_embedder

__all__ = ["BertConfig", "BertModel", "Embedder", "cosine_matrix", "load_embedder"]
