"""The exported fast tokenizer equals SentencePiece, piece for piece, and decodes losslessly."""
from __future__ import annotations

import pytest

EDGE_CASES = [
    "", " ", "a", "  two  spaces\tand a tab\n\n\nnewlines\r\n", "The pass key is 83921. Remember it.",
    "digits 1234567890 0.5 -3e8", "ünïcödé, 漢字, emoji 🎉, RTL שלום", "a" * 300,
    "</s> <s> <pad> <unk> are plain text here", "trailing space ",
]


@pytest.fixture(scope="module")
def exported_tokenizer(tmp_path_factory, tokenizer_dir):
    from megafire.export.tokenizer import write_hf_tokenizer
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("hf_tok")
    ids = write_hf_tokenizer(tokenizer_dir / "tokenizer.model", out)
    return AutoTokenizer.from_pretrained(out), ids


def test_special_ids(exported_tokenizer):
    hf, ids = exported_tokenizer
    assert ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert hf.decode([5, 2, 6], skip_special_tokens=True) == hf.decode([5, 6])


def test_encode_decode_equal_sentencepiece(exported_tokenizer, tokenizer_dir, held_out_text):
    from megafire.data.tokenizer import Tokenizer
    hf, _ = exported_tokenizer
    sp = Tokenizer(tokenizer_dir)
    texts = EDGE_CASES + [held_out_text[i:i + 3000] for i in range(0, len(held_out_text), 3000)]
    for text in texts:
        ids = sp.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, repr(text[:80])
        assert hf.encode(text) == ids                   # no BOS/EOS added: training data has none
        assert hf.decode(ids) == sp.decode(ids) == text, repr(text[:80])


def test_unigram_model_too(tmp_path):
    from megafire.data.corpus import Document, load_corpus
    from megafire.data.tokenizer import Tokenizer, train_tokenizer
    from megafire.export.tokenizer import write_hf_tokenizer
    from transformers import AutoTokenizer
    docs = load_corpus("default", "train")
    model = train_tokenizer([Document(d.id, d.title, d.text[:8000]) for d in docs[:3]], tmp_path / "sp",
                            vocab_size=400, model_type="unigram")
    write_hf_tokenizer(model, tmp_path / "hf")
    sp, hf = Tokenizer(model), AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in EDGE_CASES[:-2] + [docs[5].text[:5000]]:
        assert hf.encode(text) == sp.encode(text), repr(text[:80])
        assert hf.decode(sp.encode(text)) == text


def test_unsupported_normalization_is_refused(tmp_path):
    import sentencepiece as spm
    from megafire.export.tokenizer import build_fast_tokenizer
    text = "some text for a tokenizer with the default normalization.\n" * 200
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "nfkc"),
                                   vocab_size=25, minloglevel=2)
    with pytest.raises(ValueError, match="normalization"):
        build_fast_tokenizer(tmp_path / "nfkc.model")
