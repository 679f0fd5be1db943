"""Prompts as text: fvfunc's umT5 encoding against diffusers' WanPipeline on a tiny random umT5."""

import logging

import pytest
import torch

from fvfunc import text
from fvfunc.testing import tiny


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    tiny.write_text_encoder(root)
    return root


def test_encode_equals_wan_pipeline(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=text.load_encoder(folder).tokenizer, text_encoder=text.load_encoder(folder).model,
                       vae=None, scheduler=None, transformer=None)
    prompts = ["a cat runs on the beach", "", "  a   red &amp; blue bird\n flies  ", "a zebra in snow"]
    negative = ["blurry low quality", "static", "", "a dog"]
    with torch.no_grad():  # as WanPipeline.__call__ runs it
        want, want_neg = pipe.encode_prompt(prompts, negative, max_sequence_length=64, device="cpu")
    encoder = text.load_encoder(folder)
    got = text.encode(encoder, prompts, max_length=64)
    assert got.shape == (4, 64, 32) and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(text.encode(encoder, negative, max_length=64), want_neg)
    # zero past each prompt's tokens (eos included): "" is the eos alone, and still not zero
    lengths = (got.abs().sum(-1) > 0).sum(1).tolist()
    assert lengths == [7, 1, 7, 5]
    # the cleaning: HTML entities, whitespace runs; an unknown word is <unk>, not dropped
    assert text.clean("  a   red &amp;amp; blue\n") == "a red & blue"
    assert torch.equal(text.encode_prompts(folder, prompts[:1], max_length=64), got[:1])


def test_long_prompt_is_cropped_with_a_warning(folder, caplog):
    encoder = text.load_encoder(folder)
    long = " ".join(["a cat"] * 20)  # 40 words + eos
    with caplog.at_level(logging.WARNING, logger="fvfunc"):
        got = text.encode(encoder, ["a dog", long], max_length=16)
    assert "prompt 1 has 41 tokens: cropped to the first 16" in caplog.text
    assert "prompt 0" not in caplog.text
    assert (got[1].abs().sum(-1) > 0).all()  # all 16 positions are tokens (15 words and the eos)
    crop = text.encode(encoder, [" ".join(long.split()[:15])], max_length=16)
    torch.testing.assert_close(got[1], crop[0], rtol=1e-6, atol=1e-6)


def test_folder_without_encoder(tmp_path):
    assert not text.has_encoder(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path} has no text_encoder/ and no tokenizer/"):
        text.load_encoder(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer/:"):
        text.load_encoder(tmp_path)
    with pytest.raises(TypeError, match="list of strings"):
        text.encode(None, "a cat")


def test_tiny_writer_restores_the_global_rng(tmp_path):
    state = torch.get_rng_state()
    tiny.write_text_encoder(tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    assert text.has_encoder(tmp_path)
