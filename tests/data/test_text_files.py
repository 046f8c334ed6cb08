"""imcap.data.text_files: UTF-8 text, CSV rows and JSON from user files, errors naming file:line."""

from __future__ import annotations

import pytest

from imcap.data.text_files import csv_rows, load_json, read_text, require_str
from imcap.errors import ImcapError


def test_read_text_drops_a_byte_order_mark_and_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffline one\nline two é\n".encode())
    assert read_text(path) == "line one\nline two é\n"
    path.write_bytes(b"\xef\xbb\xbfok\nok\nbad \xe9 here\n")
    with pytest.raises(ImcapError, match=r"a.txt:3: not UTF-8 \(byte 0xe9: invalid continuation byte\)"):
        read_text(path)
    with pytest.raises(ImcapError, match=r"nowhere.txt: no such file"):
        read_text(tmp_path / "nowhere.txt")


def test_csv_rows_number_the_lines_a_row_starts_after(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('image,caption\na.jpg,"two\nlines"\nb.jpg,one\n', encoding="utf-8")
    assert list(csv_rows(path)) == [(1, ["image", "caption"]), (3, ["a.jpg", "two\nlines"]), (4, ["b.jpg", "one"])]


def test_load_json_names_the_line_of_a_syntax_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}', encoding="utf-8")
    assert load_json(path) == {"a": 1}
    path.write_text('{\n"a": 1,\n}', encoding="utf-8")
    with pytest.raises(ImcapError, match=r"d.json:3: not valid JSON"):
        load_json(path)


def test_require_str_names_where_and_what():
    assert require_str("x", "f.json: entry 1", "caption") == "x"
    with pytest.raises(ImcapError, match=r"f.json: entry 1: caption must be a string, got int '5'"):
        require_str(5, "f.json: entry 1", "caption")
