"""Prompt styles (engine/styles.py): A1111's styles.csv, applied, saved, edited and deleted."""
from __future__ import annotations

import csv
import logging

import pytest

from engine.errors import EaselError, RequestError
from engine.styles import MAX_NAME_CHARS, STYLES_FILE, Styles, merge_prompt

HEADER = "name,prompt,negative_prompt\r\n"


def write(path, text: str, bom: bool = False) -> None:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


@pytest.fixture
def styles(tmp_path):
    path = tmp_path / STYLES_FILE
    write(path, HEADER + 'Cinematic,"cinematic still of {prompt}, film grain","cartoon, {prompt}"\r\n'
                         'Sharp,"sharp focus, 8k",blurry\r\n'
                         'Empty,,\r\n')
    return Styles(path)


def test_merge_prompt_as_a1111():
    assert merge_prompt("art of {prompt}, oil", "a cat") == "art of a cat, oil"
    assert merge_prompt("oil painting", "a cat ") == "a cat, oil painting"
    assert merge_prompt("oil painting", "") == "oil painting"
    assert merge_prompt("", "a cat") == "a cat"
    assert merge_prompt("{prompt} and {prompt}", "x") == "x and x"


def test_the_placeholder_takes_the_prompt_and_the_negative(styles):
    assert styles.apply("a cat", "ugly", ["Cinematic"]) == ("cinematic still of a cat, film grain", "cartoon, ugly")


def test_without_a_placeholder_the_style_is_appended(styles):
    assert styles.apply("a cat", "", ["Sharp"]) == ("a cat, sharp focus, 8k", "blurry")
    assert styles.apply("a cat", "ugly", ["Sharp"]) == ("a cat, sharp focus, 8k", "ugly, blurry")
    assert styles.apply("a cat", "ugly", ["Empty"]) == ("a cat", "ugly")


def test_several_styles_apply_in_order(styles):
    assert styles.apply("a cat", "ugly", ["Sharp", "Cinematic"]) == \
        ("cinematic still of a cat, sharp focus, 8k, film grain", "cartoon, ugly, blurry")
    assert styles.apply("a cat", "ugly", ["Cinematic", "Sharp"]) == \
        ("cinematic still of a cat, film grain, sharp focus, 8k", "cartoon, ugly, blurry")


def test_no_styles_leave_the_prompts_alone(styles):
    assert styles.apply("a cat", "ugly", []) == ("a cat", "ugly")
    assert styles.apply("a cat", "ugly", None) == ("a cat", "ugly")


@pytest.mark.parametrize("names", [["Nope"], ["Sharp", "Nope"], "Sharp", [3]])
def test_an_unknown_style_or_a_bad_list_names_styles(styles, names):
    with pytest.raises(RequestError) as caught:
        styles.apply("a cat", "", names)
    assert caught.value.field == "styles" and str(caught.value).startswith("styles: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ['name,prompt\r\n"unclosed,x\r\n', "no,header,here\r\nA,b,c\r\n"])
def test_a_malformed_file_gives_no_styles_and_a_warning(tmp_path, caplog, text):
    path = tmp_path / STYLES_FILE
    write(path, text)
    with caplog.at_level(logging.WARNING, logger="engine.styles"):
        assert Styles(path).names() == []
    assert any("is not read" in r.getMessage() for r in caplog.records)
    with pytest.raises(EaselError):  # never written over: nothing in it is lost
        Styles(path).save("New", "x", "")
    assert path.read_bytes() == text.encode()


def test_a_file_that_is_not_utf8_gives_no_styles(tmp_path, caplog):
    path = tmp_path / STYLES_FILE
    path.write_bytes(b"name,prompt,negative_prompt\r\n\xff\xfe,x,y\r\n")
    with caplog.at_level(logging.WARNING, logger="engine.styles"):
        assert Styles(path).all() == []
    assert caplog.records


def test_a_missing_file_gives_no_styles(tmp_path):
    assert Styles(tmp_path / STYLES_FILE).all() == []


def test_a_bom_file_reads_and_keeps_its_bom(tmp_path):
    path = tmp_path / STYLES_FILE
    write(path, HEADER + "Café,au lait {prompt},\r\n", bom=True)
    styles = Styles(path)
    assert styles.names() == ["Café"]
    assert styles.apply("x", "", ["Café"]) == ("au lait x", "")
    styles.save("Other", "o", "")
    assert path.read_bytes().startswith(b"\xef\xbb\xbfname,")
    assert styles.names() == ["Café", "Other"]


def test_the_old_text_column_reads_as_the_prompt(tmp_path):
    path = tmp_path / STYLES_FILE
    write(path, "name,text,negative_prompt\r\nOld,old {prompt},bad\r\n")
    assert Styles(path).apply("p", "", ["Old"]) == ("old p", "bad")


def rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f))


def test_save_overwrite_and_delete_keep_the_other_rows_and_the_columns(tmp_path):
    path = tmp_path / STYLES_FILE
    write(path, "negative_prompt,name,prompt,note\r\nbad,First,first {prompt},mine\r\nworse,Second,second,\r\n")
    styles = Styles(path)
    styles.save("Third", "third, {prompt}", "awful")
    assert rows(path) == [["negative_prompt", "name", "prompt", "note"], ["bad", "First", "first {prompt}", "mine"],
                          ["worse", "Second", "second", ""], ["awful", "Third", "third, {prompt}", ""]]
    styles.save("First", "new first", "")  # overwritten in its place; its extra column kept
    assert rows(path)[1] == ["", "First", "new first", "mine"]
    styles.delete("Second")
    assert [r[1] for r in rows(path)] == ["name", "First", "Third"]
    assert [p.name for p in tmp_path.iterdir()] == [STYLES_FILE]  # no temp file left
    with pytest.raises(RequestError) as caught:
        styles.delete("Second")
    assert caught.value.field == "style"


def test_save_creates_the_file_and_rereads(tmp_path):
    path = tmp_path / "data" / STYLES_FILE
    Styles(path).save("  Mood ", 'a "quoted", comma {prompt}', "line\nbreak")
    assert rows(path)[0] == ["name", "prompt", "negative_prompt"]
    assert Styles(path).all()[0].as_dict() == {"name": "Mood", "prompt": 'a "quoted", comma {prompt}',
                                               "negative_prompt": "line\nbreak"}


def test_a_failed_write_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / STYLES_FILE
    write(path, HEADER + "A,a,\r\n")
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.atomic.os.fsync", broken_fsync)
    with pytest.raises(EaselError, match="^styles: cannot write"):
        Styles(path).save("B", "b", "")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [STYLES_FILE]


@pytest.mark.parametrize("name", ["", "   ", "x" * (MAX_NAME_CHARS + 1), "tab\there", "new\nline", "nul\x00", 5, None])
def test_style_names_are_bounded(tmp_path, name):
    with pytest.raises(RequestError) as caught:
        Styles(tmp_path / STYLES_FILE).save(name, "p", "")
    assert caught.value.field == "style"
    assert not (tmp_path / STYLES_FILE).exists()


def test_style_texts_are_checked(tmp_path):
    with pytest.raises(RequestError) as caught:
        Styles(tmp_path / STYLES_FILE).save("ok", "bell\x07", "")
    assert caught.value.field == "prompt"


def test_the_engine_methods(tmp_path):
    from engine.engine import Engine, EngineConfig

    engine = Engine(EngineConfig(models_dir=tmp_path / "models", outputs_dir=tmp_path / "out",
                                 data_dir=tmp_path / "data", device="cpu"))
    assert engine.style_names() == [] and engine.styles() == []
    engine.save_style("Ink", "ink drawing of {prompt}", "color")
    engine.save_style("Sharp", "sharp", "")
    assert engine.style_names() == ["Ink", "Sharp"]
    assert engine.styles()[0] == {"name": "Ink", "prompt": "ink drawing of {prompt}", "negative_prompt": "color"}
    assert engine.apply_styles("a fox", "blur", ["Ink", "Sharp"]) == ("ink drawing of a fox, sharp", "blur, color")
    assert (tmp_path / "data" / STYLES_FILE).is_file()
    engine.delete_style("Ink")
    assert engine.style_names() == ["Sharp"]
    with pytest.raises(RequestError, match="^styles: "):
        engine.apply_styles("a", "", ["Ink"])
