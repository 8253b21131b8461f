"""GGUF files import into checkpoints that reproduce their source model and tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import CHAT_TEMPLATE, write_gguf
from safetensors.numpy import load_file

from model.checkpoint import load_checkpoint
from model.generate import generate_tokens
from model.gguf_import import GGUFImportError, read_gguf, write_hf_directory
from model.tokenizer import Tokenizer

PROMPTS = ("def add(a, b):\n    return", "The file is opened and", "Return the 3 largest")


@pytest.fixture(params=["llama", "qwen2"])
def source(request: pytest.FixtureRequest, micro_checkpoint: Path,
           micro_qwen2_checkpoint: Path) -> Path:
    return micro_checkpoint if request.param == "llama" else micro_qwen2_checkpoint


def _import(source: Path, tmp_path: Path, **kw: str) -> Path:
    gguf_file = write_gguf(source, tmp_path / "model.gguf", **kw)
    return write_hf_directory(read_gguf(gguf_file), tmp_path / "imported")


def test_f32_gguf_imports_bit_identical_weights(source: Path, tmp_path: Path) -> None:
    imported = _import(source, tmp_path)
    want, got = load_file(str(source / "model.safetensors")), load_file(
        str(imported / "model.safetensors"))
    assert sorted(got) == sorted(want)  # tied embeddings stay tied: no lm_head appears
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array.astype(np.float32), err_msg=name)


def test_imported_model_generates_what_the_source_does(source: Path, tmp_path: Path) -> None:
    imported = _import(source, tmp_path)
    ours, theirs = Tokenizer.from_dir(imported), Tokenizer.from_dir(source)
    a, b = load_checkpoint(source), load_checkpoint(imported)
    for prompt in PROMPTS:
        ids = theirs.encode(prompt)
        assert ours.encode(prompt) == ids
        want = list(generate_tokens(a, ids, 16, eos_id=theirs.eos_id))
        assert list(generate_tokens(b, ids, 16, eos_id=ours.eos_id)) == want
        assert ours.decode(want) == theirs.decode(want)


def test_imported_directory_loads_in_transformers(micro_checkpoint: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    imported = _import(micro_checkpoint, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(imported)
    ids = Tokenizer.from_dir(micro_checkpoint).encode(PROMPTS[0], add_bos=False)
    assert tok(PROMPTS[0], add_special_tokens=False).input_ids == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, load_checkpoint(micro_checkpoint)(x),
                                   rtol=1e-4, atol=1e-4)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_q8_0_gguf_dequantizes_close_to_the_source(micro_checkpoint: Path, tmp_path: Path) -> None:
    imported = _import(micro_checkpoint, tmp_path, quantize_to="Q8_0")
    ids = Tokenizer.from_dir(micro_checkpoint).encode(PROMPTS[1])
    x = torch.tensor([ids])
    with torch.no_grad():
        want, got = load_checkpoint(micro_checkpoint)(x), load_checkpoint(imported)(x)
    # Q8_0 keeps 8 bits per weight: the next-token choice survives, the logits move slightly.
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert (got - want).abs().max() < 0.5


def test_unsupported_gguf_is_refused_with_what_it_holds(micro_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    spm = write_gguf(micro_checkpoint, tmp_path / "spm.gguf", tokenizer_model="llama")
    with pytest.raises(GGUFImportError, match="tokenizer model 'llama' is not supported"):
        read_gguf(spm)
    odd = write_gguf(micro_checkpoint, tmp_path / "pre.gguf", pre="made-up")
    with pytest.raises(GGUFImportError, match="pre-tokenizer 'made-up' is not supported"):
        read_gguf(odd)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        read_gguf(junk)


def test_catalog_imports_gguf_and_hf_directories(micro_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from model.catalog import CatalogError, import_model, list_models, model_dir, model_record
    from tandem.cli import main

    root = tmp_path / "models"
    gguf_file = write_gguf(micro_checkpoint, tmp_path / "Tiny-Chat.gguf")
    assert main(["model", "import", str(gguf_file), "--models-dir", str(root)]) == 0
    assert "imported tiny-chat: llama" in capsys.readouterr().out
    hf = import_model(micro_checkpoint, "tiny-hf", root)
    assert [r.name for r in list_models(root)] == ["tiny-chat", "tiny-hf"]
    chat = model_record("tiny-chat", root)
    assert (chat.architecture, chat.context, chat.chat_template) == ("llama", 256, True)
    assert (hf.parameters, hf.chat_template) == (chat.parameters, False)
    assert load_checkpoint(model_dir("tiny-hf", root)).args.vocab_size == 512
    with pytest.raises(CatalogError, match=r"already exists.*--replace"):
        import_model(gguf_file, "tiny-chat", root)
    with pytest.raises(CatalogError, match="model name must be lowercase"):
        import_model(gguf_file, "Tiny Chat", root)
    with pytest.raises(CatalogError, match=r"no model 'nope' .*known: tiny-chat, tiny-hf"):
        model_dir("nope", root)
    assert main(["model", "import", str(tmp_path / "missing"), "--models-dir", str(root)]) == 1
    assert "neither a .gguf file nor a directory" in capsys.readouterr().err
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no half-imported dirs
    assert main(["model", "list", "--models-dir", str(root)]) == 0
    assert "tiny-hf" in capsys.readouterr().out
