"""A1111 prompt syntax, 75-token chunking and weighted encoding (engine/prompts.py)."""
from __future__ import annotations

import pytest
import torch

import engine.compat  # noqa: F401 - torchvision shim before transformers/diffusers
from engine.prompts import BREAK, PromptEncoder, chunk_prompt, parse_prompt_attention
from engine.tokenizers import load_clip_tokenizer
from tiny_models import tiny_sd1_pipeline, tiny_text_encoder

CPU = torch.device("cpu")
CAT_200 = "cat " * 200  # "cat" is one CLIP token: 200 tokens, no commas


def approx_runs(runs):
    return [(text, pytest.approx(weight)) for text, weight in runs]


# --- parser: cases from A1111's parse_prompt_attention doctests and docs ---------------------

def test_parse_plain_text_has_weight_one():
    assert parse_prompt_attention("normal text") == [("normal text", 1.0)]


def test_parse_round_brackets_multiply_by_1_1():
    assert parse_prompt_attention("an (important) word") == approx_runs(
        [("an ", 1.0), ("important", 1.1), (" word", 1.0)])


def test_parse_nested_round_brackets_compound():
    assert parse_prompt_attention("((word))") == approx_runs([("word", 1.21)])


def test_parse_square_brackets_divide_by_1_1():
    assert parse_prompt_attention("a [quiet] room") == approx_runs(
        [("a ", 1.0), ("quiet", 1 / 1.1), (" room", 1.0)])


def test_parse_explicit_weight():
    assert parse_prompt_attention("a (red:1.3) ball") == approx_runs(
        [("a ", 1.0), ("red", 1.3), (" ball", 1.0)])


def test_parse_unbalanced_open_bracket_runs_to_the_end():
    assert parse_prompt_attention("(unbalanced") == approx_runs([("unbalanced", 1.1)])


def test_parse_stray_closing_bracket_is_text():
    assert parse_prompt_attention("a) b]") == [("a) b]", 1.0)]


def test_parse_escaped_brackets_are_literal():
    assert parse_prompt_attention(r"\(literal\]") == [("(literal]", 1.0)]


def test_parse_colon_without_number_is_text():
    assert parse_prompt_attention("(style: oil)") == approx_runs([("style: oil", 1.1)])


def test_parse_adjacent_groups_with_equal_weight_merge():
    assert parse_prompt_attention("(unnecessary)(parens)") == approx_runs([("unnecessaryparens", 1.1)])


def test_parse_a1111_mixed_doctest():
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == approx_runs([
        ("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
        ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1),
    ])


def test_parse_break_keyword_becomes_marker():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]


def test_parse_break_inside_brackets_stays_a_marker():
    runs = parse_prompt_attention("(a cat BREAK a dog)")
    assert runs == approx_runs([("a cat", 1.1)]) + [BREAK] + approx_runs([("a dog", 1.1)])


def test_parse_empty_prompt():
    assert parse_prompt_attention("") == [("", 1.0)]


# --- chunking ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def clip_tokenizer():
    return load_clip_tokenizer("clip-l")


def test_200_tokens_split_75_75_50(clip_tokenizer):
    assert [len(c.tokens) for c in chunk_prompt(CAT_200, clip_tokenizer)] == [75, 75, 50]


def test_chunk_breaks_after_a_comma_near_the_end(clip_tokenizer):
    # 65 tokens, a comma (token 66), then 20 more: the comma is 10 tokens from the end of chunk 1,
    # so the 9 words after it move to chunk 2 instead of being cut.
    chunks = chunk_prompt("cat " * 65 + ", " + "dog " * 20, clip_tokenizer)
    assert [len(c.tokens) for c in chunks] == [66, 20]


def test_chunk_ignores_a_comma_far_from_the_end(clip_tokenizer):
    chunks = chunk_prompt("cat " * 40 + ", " + "dog " * 50, clip_tokenizer)
    assert [len(c.tokens) for c in chunks] == [75, 16]


def test_break_starts_a_new_chunk(clip_tokenizer):
    chunks = chunk_prompt("a cat BREAK a dog", clip_tokenizer)
    assert [len(c.tokens) for c in chunks] == [2, 2]


def test_chunk_weights_follow_tokens(clip_tokenizer):
    (chunk,) = chunk_prompt("a (cat:1.5)", clip_tokenizer)
    assert chunk.weights == (1.0, 1.5)


# --- SD1 encoding --------------------------------------------------------------------------

def give_mean(text_encoder):
    # A fresh final LayerNorm (bias 0) makes every token's mean exactly 0, so A1111's mean
    # restoration would divide noise by noise; trained CLIP towers have a bias, so give one.
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.normal_(0.3, 0.1, generator=torch.Generator().manual_seed(0))
    return text_encoder


@pytest.fixture(scope="session")
def sd1_pipe():
    pipe = tiny_sd1_pipeline()
    give_mean(pipe.text_encoder)
    return pipe


@pytest.fixture()
def sd1_encoder(sd1_pipe):
    return PromptEncoder([sd1_pipe.tokenizer], [sd1_pipe.text_encoder], device=CPU, dtype=torch.float32)


def test_plain_short_prompt_equals_diffusers(sd1_pipe, sd1_encoder):
    prompt = "a photo of a cat, oil painting"
    expected, _ = sd1_pipe.encode_prompt(prompt, CPU, 1, False)
    enc = sd1_encoder.encode(prompt)
    assert enc.pooled is None
    assert torch.equal(enc.embeds, expected)


def test_200_token_prompt_encodes_three_chunks(sd1_encoder):
    assert sd1_encoder.encode(CAT_200).embeds.shape == (1, 3 * 77, 64)


def test_chunk_is_encoded_on_its_own(sd1_encoder):
    # The second chunk of "cat"x150 is the same 75 tokens as "cat"x75, with its own BOS/EOS.
    long = sd1_encoder.encode("cat " * 150).embeds
    assert torch.allclose(long[:, 77:], sd1_encoder.encode("cat " * 75).embeds, atol=1e-6)


def test_pair_pads_negative_with_empty_chunks(sd1_encoder):
    positive, negative = sd1_encoder.encode_pair(CAT_200, "blurry")
    assert positive.embeds.shape == negative.embeds.shape == (1, 3 * 77, 64)
    empty = sd1_encoder.encode("").embeds
    assert torch.equal(negative.embeds[:, 77:154], empty)
    assert torch.equal(negative.embeds[:, 154:], empty)


def test_pair_pads_prompt_when_negative_is_longer(sd1_encoder):
    positive, negative = sd1_encoder.encode_pair("a cat", CAT_200)
    assert positive.embeds.shape == negative.embeds.shape == (1, 3 * 77, 64)


def test_weight_one_everywhere_equals_no_weights(sd1_encoder):
    weighted = sd1_encoder.encode("(a:1.0) (photo of:1.0) a (cat:1.0)").embeds
    assert torch.equal(weighted, sd1_encoder.encode("a photo of a cat").embeds)


def test_weighted_word_changes_embeddings(sd1_encoder):
    assert not torch.allclose(sd1_encoder.encode("a (cat:1.5) on a mat").embeds,
                              sd1_encoder.encode("a cat on a mat").embeds)


def test_weighted_token_scaled_relative_to_the_rest(sd1_encoder):
    # After the mean rescale every token is multiplied by the same factor except the weighted
    # one, which gets 1.5 times that factor. Position 2 is "cat" (BOS, "a", "cat", ...).
    ratio = sd1_encoder.encode("a (cat:1.5) on a mat").embeds / sd1_encoder.encode("a cat on a mat").embeds
    per_token = ratio[0].median(dim=-1).values
    others = torch.cat([per_token[:2], per_token[3:]])
    assert torch.allclose(others, others[0].expand_as(others), rtol=1e-4)
    assert per_token[2] / others[0] == pytest.approx(1.5, rel=1e-4)


def test_weighting_restores_the_chunk_mean(sd1_encoder):
    weighted = sd1_encoder.encode("a ((cat)) on a [mat], (sunset:1.8)").embeds
    plain = sd1_encoder.encode("a cat on a mat, sunset").embeds
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_cache_hit_skips_the_text_encoder(sd1_pipe, sd1_encoder):
    calls = []
    hook = sd1_pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = sd1_encoder.encode("a cached cat")
        second = sd1_encoder.encode("a cached cat")
    finally:
        hook.remove()
    assert len(calls) == 1
    assert second is first


def test_cache_evicts_least_recently_used(sd1_pipe):
    encoder = PromptEncoder([sd1_pipe.tokenizer], [sd1_pipe.text_encoder], device=CPU, dtype=torch.float32,
                            cache_size=1)
    calls = []
    hook = sd1_pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        for prompt in ("a cat", "a dog", "a cat"):
            encoder.encode(prompt)
    finally:
        hook.remove()
    assert len(calls) == 3


def test_output_dtype_follows_the_plan(sd1_pipe):
    encoder = PromptEncoder([sd1_pipe.tokenizer], [sd1_pipe.text_encoder], device=CPU, dtype=torch.bfloat16)
    assert encoder.encode("a (cat:1.2)").embeds.dtype == torch.bfloat16


# --- SDXL encoding (two encoders) ----------------------------------------------------------

@pytest.fixture(scope="session")
def sdxl_pipe():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    # Only encode_prompt is used, so no UNet or VAE. Encoder 2 is an OpenCLIP-style tower: a
    # different width, a projection, and "!" (id 0) padding.
    return StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=EulerDiscreteScheduler(),
        text_encoder=tiny_text_encoder(0), tokenizer=load_clip_tokenizer("clip-l"),
        text_encoder_2=tiny_text_encoder(1, hidden=128, projection=32, pad_token_id=0),
        tokenizer_2=load_clip_tokenizer("open-clip"),
    )


@pytest.fixture()
def sdxl_encoder(sdxl_pipe):
    return PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2],
                         [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], device=CPU, dtype=torch.float32)


def test_sdxl_plain_short_prompt_equals_diffusers(sdxl_pipe, sdxl_encoder):
    prompt = "a photo of a cat, oil painting"
    embeds, _, pooled, _ = sdxl_pipe.encode_prompt(prompt, device=CPU, num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    enc = sdxl_encoder.encode(prompt)
    assert enc.embeds.shape == (1, 77, 64 + 128)
    assert torch.equal(enc.embeds, embeds)
    assert torch.equal(enc.pooled, pooled)


def test_sdxl_pooled_comes_from_the_first_chunk(sdxl_encoder):
    long = sdxl_encoder.encode(CAT_200)
    assert long.embeds.shape == (1, 3 * 77, 192)
    assert torch.allclose(long.pooled, sdxl_encoder.encode("cat " * 75).pooled, atol=1e-6)


def test_sdxl_zero_empty_negative(sdxl_pipe):
    encoder = PromptEncoder([sdxl_pipe.tokenizer, sdxl_pipe.tokenizer_2],
                            [sdxl_pipe.text_encoder, sdxl_pipe.text_encoder_2], device=CPU,
                            dtype=torch.float32, zero_empty_negative=True)
    positive, negative = encoder.encode_pair(CAT_200, "")
    assert negative.embeds.shape == positive.embeds.shape
    assert not negative.embeds.any() and not negative.pooled.any()
