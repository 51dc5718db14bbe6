"""The models folder: A1111 layout, names resolve only inside it."""
import pytest

from engine.errors import ModelNotFoundError
from engine.library import ModelLibrary, model_hash


@pytest.fixture()
def library(tmp_path):
    sd = tmp_path / "Stable-diffusion"
    (sd / "anime").mkdir(parents=True)
    (sd / "base.safetensors").write_bytes(b"not really weights")
    (sd / "anime" / "style.ckpt").write_bytes(b"x")
    (sd / "notes.txt").write_text("ignored")
    (sd / "folder-model" / "unet").mkdir(parents=True)
    (sd / "folder-model" / "model_index.json").write_text("{}")
    (sd / "folder-model" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u")
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    return ModelLibrary(tmp_path)


def test_scan_finds_files_subfolders_and_diffusers_folders(library):
    assert [e.name for e in library.entries()] == ["anime/style.ckpt", "base.safetensors", "folder-model"]


def test_resolve_by_name_stem_and_a1111_title(library):
    assert library.resolve("base.safetensors").name == "base.safetensors"
    assert library.resolve("base").name == "base.safetensors"
    assert library.resolve("anime/style.ckpt [0123456789]").name == "anime/style.ckpt"


@pytest.mark.parametrize("name", ["../secret.safetensors", "../secret", "/etc/passwd", "Stable-diffusion/../../x"])
def test_names_never_escape_the_models_folder(library, name):
    with pytest.raises(ModelNotFoundError, match="is not in"):
        library.resolve(name)


def test_model_hash_is_sha256_prefix_and_cached(tmp_path):
    import hashlib

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"abc" * 1000)
    cache = tmp_path / "hashes.json"
    assert model_hash(f, cache) == hashlib.sha256(b"abc" * 1000).hexdigest()[:10]
    assert cache.is_file() and hashlib.sha256(b"abc" * 1000).hexdigest() in cache.read_text()


def test_missing_models_folder_is_empty_not_an_error(tmp_path):
    assert ModelLibrary(tmp_path / "nowhere").entries() == []


def test_extra_entries_list_a_kinds_folders_by_name_inside_the_models_folder(tmp_path):
    for sub, fn in [("Lora", "a.safetensors"), ("LyCORIS", "b.pt"), ("Lora", "readme.txt"), ("VAE", "v.ckpt")]:
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / fn).write_bytes(b"x")
    assert [e.name for e in ModelLibrary(tmp_path).extra_entries("LoRA")] == ["Lora/a.safetensors", "LyCORIS/b.pt"]


def test_a_folder_named_like_a_checkpoint_is_listed_not_walked_into(tmp_path):
    odd = tmp_path / "Stable-diffusion" / "odd.safetensors"
    odd.mkdir(parents=True)
    (odd / "inner.ckpt").write_bytes(b"x")
    assert [e.name for e in ModelLibrary(tmp_path).entries()] == ["odd.safetensors"]
