"""Textual-inversion embeddings: files written here in A1111's and diffusers' formats, found in
`embeddings/` beside the models folder (and models/embeddings), their vectors put where their
name stands in a prompt, and their hashes recorded in the infotext."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from engine.embeddings import Embeddings, embedding_hash
from engine.infotext import values_from_params
from engine.library import ModelLibrary
from engine.prompt_syntax import EMBEDDING_PLACEHOLDER, chunk_prompt
from engine.prompts import PromptEncoder
from engine.tokenizers import load_clip_tokenizer
from tests.conftest import loaded_engine
from tests.tiny_models import SDXL_PROJECTION, tiny_open_clip_text_encoder, tiny_text_encoder

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 5}


def rows(encoder, tokenizer, words: str) -> torch.Tensor:
    """The token embedding rows the words tokenize to: an embedding that means exactly these words."""
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    return encoder.get_input_embeddings().weight[ids].detach().clone()


@pytest.fixture(scope="module")
def sd1():
    return load_clip_tokenizer("clip-l"), tiny_text_encoder(0)


def encoder_for(tokenizer, text_encoder) -> PromptEncoder:
    return PromptEncoder([tokenizer], [text_encoder], device=torch.device("cpu"), dtype=torch.float32)


def library_with(tmp_path, files: dict) -> ModelLibrary:
    """A models folder whose embeddings sit beside it (A1111's layout); `files`: name -> writer."""
    folder = tmp_path / "embeddings"
    folder.mkdir(exist_ok=True)
    for name, write in files.items():
        write(folder / name)
    (tmp_path / "models").mkdir(exist_ok=True)
    return ModelLibrary(tmp_path / "models")


def test_an_embedding_stands_for_its_vectors_where_its_name_is(sd1, tmp_path):
    tokenizer, text_encoder = sd1
    vectors = rows(text_encoder, tokenizer, "red dog")
    library = library_with(tmp_path, {"mytoken.safetensors": lambda p: save_file({"emb_params": vectors}, str(p))})
    encoder = encoder_for(tokenizer, text_encoder)
    encoder.set_embeddings(Embeddings(library).for_encoders([text_encoder]))
    plain = encoder_for(tokenizer, text_encoder)
    assert torch.equal(encoder.encode("a photo of a mytoken").embeds, plain.encode("a photo of a red dog").embeds)
    assert encoder.encode("a photo of a mytoken").embeddings == ("mytoken",)


def test_an_embedding_changes_nothing_before_its_word_nor_prompts_without_it(sd1, tmp_path):
    tokenizer, text_encoder = sd1
    g = torch.Generator().manual_seed(0)
    library = library_with(tmp_path, {"mytoken.pt": lambda p: torch.save({"emb_params": torch.randn(3, 64, generator=g)}, p)})
    with_it = encoder_for(tokenizer, text_encoder)
    with_it.set_embeddings(Embeddings(library).for_encoders([text_encoder]))
    plain = encoder_for(tokenizer, text_encoder)
    assert torch.equal(with_it.encode("a castle, mytokens").embeds, plain.encode("a castle, mytokens").embeds)
    changed = with_it.encode("a castle, mytoken").embeds[0]
    before = 1 + len(tokenizer("a castle,", add_special_tokens=False)["input_ids"])  # BOS and the words before it
    same = plain.encode("a castle, mytoken").embeds[0]
    assert torch.equal(changed[:before], same[:before])
    assert not torch.allclose(changed[before:before + 3], same[before:before + 3])


def test_an_embeddings_vectors_take_its_count_of_places_in_one_chunk(sd1):
    tokenizer, _ = sd1
    chunks = chunk_prompt("word " * 73 + "mytoken", tokenizer, embeddings={"mytoken": 3})
    assert len(chunks) == 2 and len(chunks[0].tokens) == 73
    assert chunks[1].tokens == (EMBEDDING_PLACEHOLDER,) * 3
    assert [(f.offset, f.name, f.vectors) for f in chunks[1].fixes] == [(0, "mytoken", 3)]


def a1111_pt(vectors):
    return lambda p: torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "x",
                                 "step": 1000, "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, p)


@pytest.mark.parametrize("file_name, write", [
    ("a1111.pt", a1111_pt),
    ("diffusers.bin", lambda v: (lambda p: torch.save({"<cat-toy>": v[0]}, p))),  # one vector, 1-D
    ("params.safetensors", lambda v: (lambda p: save_file({"emb_params": v}, str(p)))),
])
def test_each_format_users_download_is_read(sd1, tmp_path, file_name, write):
    tokenizer, text_encoder = sd1
    vectors = rows(text_encoder, tokenizer, "dog")
    library = library_with(tmp_path, {file_name: write(vectors)})
    found = Embeddings(library).for_encoders([text_encoder])
    name = file_name.rsplit(".", 1)[0]
    assert list(found) == [name] and torch.equal(found[name].vectors[0], vectors)


def test_embeddings_are_found_beside_the_models_folder_and_inside_it(sd1, tmp_path):
    tokenizer, text_encoder = sd1
    vectors = rows(text_encoder, tokenizer, "dog")
    library = library_with(tmp_path, {"beside.safetensors": lambda p: save_file({"emb_params": vectors}, str(p))})
    (tmp_path / "models" / "embeddings").mkdir()
    save_file({"emb_params": vectors}, str(tmp_path / "models" / "embeddings" / "inside.safetensors"))
    assert sorted(Embeddings(library).for_encoders([text_encoder])) == ["beside", "inside"]
    names = [e.name for e in library.extra_entries("Embeddings")]
    assert names == ["../embeddings/beside.safetensors", "embeddings/inside.safetensors"]


def test_an_embedding_of_another_width_is_skipped_and_its_name_stays_text(sd1, tmp_path):
    tokenizer, text_encoder = sd1
    library = library_with(tmp_path, {"wide.safetensors": lambda p: save_file({"emb_params": torch.ones(2, 768)}, str(p))})
    assert Embeddings(library).for_encoders([text_encoder]) == {}


def test_a_pickle_that_would_run_code_is_never_loaded(sd1, tmp_path):
    tokenizer, text_encoder = sd1

    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)

    library = library_with(tmp_path, {"evil.pt": lambda p: torch.save({"emb_params": Evil()}, p)})
    assert Embeddings(library).for_encoders([text_encoder]) == {}
    assert not (tmp_path / "ran").exists()


def test_sdxl_embeddings_feed_both_text_encoders(tmp_path):
    tokenizers = [load_clip_tokenizer("clip-l"), load_clip_tokenizer("open-clip")]
    encoders = [tiny_text_encoder(0), tiny_open_clip_text_encoder(1, projection=SDXL_PROJECTION)]
    parts = {"clip_l": rows(encoders[0], tokenizers[0], "dog"), "clip_g": rows(encoders[1], tokenizers[1], "dog")}
    library = library_with(tmp_path, {"xl-token.safetensors": lambda p: save_file(parts, str(p))})
    with_it = PromptEncoder(tokenizers, encoders, device=torch.device("cpu"), dtype=torch.float32)
    with_it.set_embeddings(Embeddings(library).for_encoders(encoders))
    plain = PromptEncoder(tokenizers, encoders, device=torch.device("cpu"), dtype=torch.float32)
    got, want = with_it.encode("a xl-token in snow"), plain.encode("a dog in snow")
    assert torch.equal(got.embeds, want.embeds) and torch.equal(got.pooled, want.pooled)


# --- through the engine: generation, Models tab, infotext ------------------------------------

@pytest.fixture(scope="module")
def ti_engine(tiny_models_dir, tmp_path_factory, plain_cpu):
    root = tmp_path_factory.mktemp("ti")
    models = root / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    os.symlink(tiny_models_dir / "Stable-diffusion" / "tiny-sd1", models / "Stable-diffusion" / "tiny-sd1")
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(3))},
              str(root / "embeddings" / "easynegative.safetensors"))
    return loaded_engine(models, root, plain_cpu)


def test_the_models_tab_lists_embeddings(ti_engine):
    listed = ti_engine.extra_models()["Embeddings"]
    assert [(s.name, s.tensors, s.error) for s in listed] == [("../embeddings/easynegative.safetensors", 1, None)]


def test_an_embedding_in_the_negative_prompt_changes_the_image(ti_engine):
    def make(negative):
        request = ti_engine.make_request({"prompt": "a red barn", "negative_prompt": negative, **SMALL, "save_images": False})
        return ti_engine.generate(request).images[0].tobytes()
    assert make("easynegative") != make("easynegatives")


def test_ti_hashes_round_trip_through_png_info_and_send_to(ti_engine):
    request = ti_engine.make_request({"prompt": "a red barn", "negative_prompt": "blurry, easynegative", **SMALL})
    result = ti_engine.generate(request)
    path = ti_engine.library.models_dir.parent / "embeddings" / "easynegative.safetensors"
    expected = f"easynegative: {hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"
    assert embedding_hash(path) == expected.split(": ")[1]
    assert f'TI hashes: "{expected}"' in result.infotexts[0]
    fields = ti_engine.png_info(result.paths[0]).fields
    assert fields["TI hashes"] == expected
    values = values_from_params(fields)
    assert values["negative_prompt"] == "blurry, easynegative" and "TI hashes" not in values
    ti_engine.make_request(values)


def test_a_job_without_the_word_records_no_ti_hashes(ti_engine):
    result = ti_engine.generate(ti_engine.make_request({"prompt": "a red barn", **SMALL, "save_images": False}))
    assert "TI hashes" not in result.infotexts[0]
