"""Data: corpus -> SentencePiece tokenizer -> webdataset shards -> packed, resumable loader.

Import the submodules for the full API; the names below are the common entry points.
``loader`` imports torch, so it is not imported here (``megafire prep`` stays light).
"""
from .corpus import Document, load_corpus, load_corpus_meta, split_documents
from .tokenizer import Tokenizer, check_vocab, load_tokenizer, train_tokenizer

__all__ = ["Document", "load_corpus", "load_corpus_meta", "split_documents",
           "Tokenizer", "check_vocab", "load_tokenizer", "train_tokenizer"]
