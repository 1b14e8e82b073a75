"""The SentencePiece model as a Hugging Face fast tokenizer (``tokenizer.json``), exactly.

megafire's tokenizer (megafire.data.tokenizer) is lossless: identity normalization, no dummy
prefix, no whitespace collapsing, byte fallback, unk 0 / bos 1 / eos 2 / pad 3, and
``encode`` adds no special tokens. The fast tokenizer reproduces SentencePiece piece for
piece:

* normalizer: ``" " -> "▁"`` only (SentencePiece's whitespace escaping; identity otherwise);
  ``▁`` prepended when the model was trained with a dummy prefix.
* BPE: SentencePiece merges, at each step, the adjacent pair whose concatenation is the
  highest-scoring piece (leftmost on ties). The equivalent ranked merge list is every split
  ``(a, b)`` of every normal piece ``p = a + b`` with ``a`` and ``b`` normal pieces, ranked
  by ``score(p)`` descending; characters missing from the vocabulary fall back to
  ``<0xXX>`` byte pieces (``byte_fallback``).
* Unigram: the same pieces and log-probabilities (Viterbi); control and byte pieces get a
  score that can never win, since SentencePiece never matches them in text.
* special tokens are declared (so ``skip_special_tokens`` works) but never matched in text
  (``split_special_tokens``): SentencePiece encodes the text "</s>" as characters, too.
* decoder: ``"▁" -> " "``, bytes fused back into UTF-8, nothing stripped.

The SentencePiece ``tokenizer.model`` is copied alongside for tools that want it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megafire.config import ConfigError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"
NEVER = -1e9   # a Unigram score no real segmentation can lose to


def _load_proto(model_path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def _check_supported(proto, model_path: Path) -> None:
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ConfigError(f"tokenizer {model_path}: normalization {norm.name!r} is not supported by the exporter "
                         f"(megafire trains with normalization_rule_name='identity')")
    if norm.remove_extra_whitespaces:
        raise ConfigError(f"tokenizer {model_path}: remove_extra_whitespaces=true is not supported by the exporter")
    if proto.trainer_spec.model_type not in (1, 2):
        raise ConfigError(f"tokenizer {model_path}: model type {proto.trainer_spec.model_type} is not BPE or unigram")


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every split of every mergeable piece into two mergeable pieces, best piece first."""
    mergeable = {p.piece: (i, p.score) for i, p in enumerate(pieces) if p.type in (NORMAL, USER_DEFINED)}
    ranked = []
    for piece, (pid, score) in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-score, pid, mergeable[left][0], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _model(proto):
    from tokenizers import models
    pieces = proto.pieces
    unk = next(i for i, p in enumerate(pieces) if p.type == UNKNOWN)
    byte_fallback = bool(proto.trainer_spec.byte_fallback)
    if proto.trainer_spec.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        return models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=pieces[unk].piece,
                          byte_fallback=byte_fallback, fuse_unk=True)
    vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED, UNKNOWN) else NEVER) for p in pieces]
    return models.Unigram(vocab, unk_id=unk, byte_fallback=byte_fallback)


def build_fast_tokenizer(model_path: str | Path):
    """A ``tokenizers.Tokenizer`` equal to the SentencePiece model at ``model_path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    model_path = Path(model_path)
    proto = _load_proto(model_path)
    _check_supported(proto, model_path)
    tok = Tokenizer(_model(proto))
    steps = [normalizers.Replace(" ", SPACE)]
    if proto.normalizer_spec.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def special_tokens(model_path: str | Path) -> dict[str, tuple[str, int]]:
    """{"unk"|"bos"|"eos"|"pad": (piece, id)} as SentencePiece defines them (absent ones left out)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    ids = {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    return {name: (sp.id_to_piece(i), i) for name, i in ids.items() if i >= 0}


def write_hf_tokenizer(model_path: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model.

    Returns the special ids ({"bos": 1, ...}) for config.json and generation_config.json.
    """
    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build_fast_tokenizer(model_path).save(str(out_dir / "tokenizer.json"))
    shutil.copyfile(model_path, out_dir / "tokenizer.model")
    specials = special_tokens(model_path)
    names = {f"{name}_token": piece for name, (piece, _) in specials.items()}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "add_bos_token": False,          # training sequences are documents joined by EOS, no BOS
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "legacy": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    return {name: i for name, (_, i) in specials.items()}
