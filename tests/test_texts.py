"""The offline corpora of kvforge.texts: parts that never overlap, no near-duplicates between corpora,
deterministic windows, clear errors, and the calibration mix."""

from __future__ import annotations

import pytest

from kvforge import texts


@pytest.fixture(scope="module")
def parts():
    return {s: (texts.load_text(s, "calibration"), texts.load_text(s, "eval")) for s in texts.SOURCES}


def test_every_source_has_both_parts_large_enough_for_the_protocol(parts):
    for name, (cal, ev) in parts.items():
        # 4 windows of 1,024 tokens need about 20k characters; calibration needs a few pieces of 2,200
        assert len(ev) > 60_000, name
        assert len(cal) > 20_000, name


def test_calibration_and_evaluation_parts_never_overlap(parts):
    for name, (cal, ev) in parts.items():
        # no paragraph of one part is a paragraph of the other, and few of their word 8-grams are shared
        # (the rest are set phrases: "and the LORD spake unto Moses, saying", licence boilerplate)
        norm = lambda part: {" ".join(p.split()) for p in part.split("\n\n") if len(p) > 80}  # noqa: E731
        assert not norm(cal) & norm(ev), name
        assert texts.overlap(cal, ev) < 0.05, name


def test_pydoc_calibration_part_drops_the_paragraphs_repeated_in_its_evaluation_part(parts):
    cal, ev = parts["pydoc"]
    head = texts.pydoc_text()[: texts._split_point(texts.pydoc_text())]
    assert texts.overlap(head, ev) > 0.3  # CPython's help text repeats itself across topics ...
    assert texts.overlap(cal, ev) < 0.02  # ... which the calibration part leaves out
    assert ev == texts.pydoc_text()[len(head):]  # the evaluation part is the one every earlier number used
    assert texts.load_text("pydoc", "all") == texts.pydoc_text()  # "all" is the whole text (FINDINGS' protocol)


def test_no_corpus_is_near_duplicated_in_another(parts):
    for a in texts.SOURCES:
        for b in texts.SOURCES:
            if a != b:
                assert texts.overlap(parts[a][1], parts[b][0] + parts[b][1]) < 0.01, (a, b)


def test_held_out_texts_are_outside_the_calibration_mix():
    assert not set(texts.HELD_OUT) & set(texts.CALIBRATION_MIX)
    assert set(texts.HELD_OUT) | set(texts.CALIBRATION_MIX) == set(texts.SOURCES)


def test_windows_are_deterministic(tiny_llama):
    from kvforge.run import token_windows

    _, tok = tiny_llama
    for name in ("fortunes", "kjv"):
        texts._parts.cache_clear()
        a = token_windows(tok, texts.load_text(name, "eval"), 2, 64)
        texts._parts.cache_clear()
        b = token_windows(tok, texts.load_text(name, "eval"), 2, 64)
        assert all((x == y).all() for x, y in zip(a, b))


def test_text_names_expand_groups_and_refuse_unknown_names(tmp_path):
    assert texts.text_names("mix") == list(texts.CALIBRATION_MIX)
    assert texts.text_names("pydoc,held-out,pydoc") == ["pydoc", *texts.HELD_OUT]
    assert texts.text_names("all") == list(texts.SOURCES)
    f = tmp_path / "mine.txt"
    f.write_text("my text " * 100)
    assert texts.text_names(f"kjv,{f}") == ["kjv", str(f)]
    with pytest.raises(ValueError, match="unknown text 'shakespeare'"):
        texts.text_names("pydoc,shakespeare")
    with pytest.raises(ValueError, match="no text"):
        texts.text_names(" , ")
    with pytest.raises(FileNotFoundError, match="not a named source"):
        texts.load_text("nope.txt")
    with pytest.raises(ValueError, match="unknown split"):
        texts.load_text("pydoc", "train")


def test_a_user_file_whose_first_fifth_only_repeats_the_rest_has_no_calibration_part(tmp_path):
    f = tmp_path / "repeats.txt"
    f.write_text("\n\n".join(["the same paragraph of a templated file, again and again and again"] * 200))
    assert texts.load_text(str(f), "eval")
    with pytest.raises(ValueError, match="calibration part is empty"):
        texts.load_text(str(f), "calibration")


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "JARGON", tmp_path / "absent.txt.gz")
    texts._parts.cache_clear()
    try:
        with pytest.raises(texts.TextSourceMissing, match="jargon-text"):
            texts.load_text("jargon")
    finally:
        texts._parts.cache_clear()


def test_calibration_pieces_take_every_text_in_turn(tmp_path):
    pieces = texts.calibration_pieces(n=6, chars=1000)
    assert len(pieces) == 6
    for i, name in enumerate(texts.CALIBRATION_MIX):
        cal = texts.load_text(name, "calibration")
        assert pieces[i] in cal and pieces[i + 3] in cal
    f = tmp_path / "mine.txt"
    f.write_text("word " * 500)  # 2,500 characters: two pieces of 1,000, used whole (not only its first 20%)
    assert len(texts.calibration_pieces(str(f), n=2, chars=1000)) == 2
    with pytest.raises(ValueError, match="give 2 pieces"):
        texts.calibration_pieces(str(f), n=5, chars=1000)
