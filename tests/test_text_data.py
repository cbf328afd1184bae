"""Text sources: TREC, CSV/TSV (AG News layout), JSON Lines, .txt folders, detection and bad input."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from cct.errors import CCTError
from cct.kinds import detect_kind
from cct.text_data import hold_out_test, load_text, read_table, read_trec

SHARED_TREC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def trec(root: Path, train: str, test: str = "LOC:city Where is Lima ?\nHUM:ind Who is he ?\n") -> Path:
    write(root / "train_5500.label", train)
    write(root / "TREC_10.label", test)
    return root


TREC_TRAIN = ("DESC:manner How did serfdom develop ?\nLOC:city What city is big ?\nHUM:ind Who wrote it ?\n"
              "NUM:How count many innings are there ?\nLOC:country Which country is small ?\n")


def test_trec_coarse_labels_named_as_written(tmp_path):
    ds = load_text(trec(tmp_path, TREC_TRAIN))
    assert ds.classes == ["DESC", "HUM", "LOC", "NUM"]
    assert ds.train_texts[0] == "How did serfdom develop ?" and len(ds.train_texts) == 5
    assert ds.train_labels.tolist() == [0, 2, 1, 3, 2] and ds.train_labels.dtype == torch.int64
    assert ds.test_texts == ["Where is Lima ?", "Who is he ?"] and ds.test_labels.tolist() == [2, 1]
    assert ds.skipped == [] and len(ds.reported) == 1
    assert "train_5500.label:4: malformed fine label 'NUM:How'" in ds.reported[0]


def test_trec_coarse_labels_carry_the_fine_ones_for_the_second_head(tmp_path):
    ds = load_text(trec(tmp_path, TREC_TRAIN))
    assert ds.fine_classes == ["DESC:manner", "HUM:ind", "LOC:city", "LOC:country"]
    assert ds.train_fine.tolist() == [0, 2, 1, -1, 3]  # the malformed 'NUM:How' line has none
    assert ds.fine_parent == [0, 1, 2, 2]  # each fine class's coarse one, for the vote (`--fine-vote`)
    held, _ = hold_out_test(load_text(tmp_path / "train_5500.label"), fraction=0.4, seed=0)
    kept = [ds.train_texts.index(t) for t in held.train_texts]
    assert held.train_fine.tolist() == ds.train_fine[kept].tolist()  # still each text's own
    assert read_trec(tmp_path, label_level="fine").train_fine is None


def test_trec_fine_labels_skip_malformed_line(tmp_path):
    ds = read_trec(trec(tmp_path, TREC_TRAIN), label_level="fine")
    assert ds.classes == ["DESC:manner", "HUM:ind", "LOC:city", "LOC:country"]
    assert len(ds.train_texts) == 4 and ds.reported == []
    assert len(ds.skipped) == 1 and "train_5500.label:4:" in ds.skipped[0] and "skipped" in ds.skipped[0]
    with pytest.raises(AssertionError):
        read_trec(tmp_path, label_level="medium")


@pytest.mark.parametrize("line,why", [("desc:manner How ?", "expected 'COARSE:fine question'"),
                                      ("DESC How ?", "expected 'COARSE:fine question'"),
                                      ("DESC:manner   ", "empty text")])
def test_trec_bad_lines(tmp_path, line, why):
    with pytest.raises(CCTError, match=f"train_5500.label:2: {why}"):
        load_text(trec(tmp_path, "HUM:ind Who ?\n" + line + "\n"))


def test_trec_unknown_test_label(tmp_path):
    with pytest.raises(CCTError, match=r"TREC_10.label:1: unknown label 'ABBR'"):
        load_text(trec(tmp_path, TREC_TRAIN, test="ABBR:exp What is NASA ?\n"))


@pytest.mark.skipif(not SHARED_TREC.is_dir(), reason="shared TREC data absent")
def test_shared_trec():
    ds = load_text(SHARED_TREC)
    assert (len(ds.train_texts), len(ds.test_texts)) == (5444, 499)
    assert ds.classes == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert torch.bincount(ds.train_labels).tolist() == [86, 1162, 1248, 1219, 834, 895]
    assert any(r.startswith(f"{SHARED_TREC / 'train_5500.label'}:4451: malformed fine label 'NUM:How'")
               for r in ds.reported)
    assert len(ds.fine_classes) == 50 and int((ds.train_fine >= 0).sum()) == 5443 and ds.train_fine[4450] == -1
    assert [ds.fine_parent.count(c) for c in range(6)] == [2, 4, 22, 4, 5, 13]  # TREC's 50 fine classes by coarse
    fine = load_text(SHARED_TREC, label_level="fine")
    assert len(fine.train_texts) == 5443 and fine.num_classes == 50 and fine.classes == ds.fine_classes
    assert [s.split(": ")[0] for s in fine.skipped] == [f"{SHARED_TREC / 'train_5500.label'}:4451"]


# ---------------------------------------------------------------------- CSV / TSV
def test_csv_with_header_and_text_column(tmp_path):
    path = write(tmp_path / "d.csv", 'id,text,label\n1,"good, very good",pos\n2,bad,neg\n3,"fine\nreally",pos\n')
    ds = load_text(path)
    assert ds.classes == ["neg", "pos"] and ds.train_labels.tolist() == [1, 0, 1]
    assert ds.train_texts == ["good, very good", "bad", "fine really"] and ds.test_texts is None


def test_csv_header_in_any_case_and_one_without_a_label_column(tmp_path):
    ds = load_text(write(tmp_path / "c.csv", "Label,Text\npos,good\nneg,bad\n"))
    assert ds.classes == ["neg", "pos"] and ds.train_texts == ["good", "bad"]  # the header is not a text
    with pytest.raises(CCTError, match=r"b.csv:1: missing column 'label' \(columns: text, source\)"):
        load_text(write(tmp_path / "b.csv", "text,source\ngood,web\n"))  # not a headerless row of class 'text'


@pytest.mark.parametrize("table, texts", [
    ("Category,Message\nham,see you soon\nspam,win a prize\nham,ok\n", ["see you soon", "win a prize", "ok"]),  # SMS
    ("review,sentiment\ngreat film,positive\nawful,negative\nfine,positive\n", ["great film", "awful", "fine"]),  # IMDb
    ("Class Index,Title,Description\n3,Bears,Short-sellers\n4,Space,A probe\n3,Oil,Up\n",
     ["Bears Short-sellers", "Space A probe", "Oil Up"]),  # AG News as Kaggle has it
])
def test_csv_headers_named_in_words_of_the_field(tmp_path, table, texts):
    """A header names its label column (category, sentiment, class index, ...) and text columns (message, review,
    title and description, ...) without the words `label` and `text`: neither a class nor a text of its own."""
    ds = load_text(write(tmp_path / "d.csv", table))
    assert ds.train_texts == texts and len(ds.classes) == 2


def test_one_class_and_labels_that_are_texts(tmp_path):
    with pytest.raises(CCTError, match=r"one class only \('pos'\); a classifier needs two or more"):
        load_text(write(tmp_path / "one.csv", "label,text\npos,good\npos,fine\n"))
    rows = "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20))  # the label is the second column
    with pytest.raises(CCTError, match=r"20 of its 20 labels occur once .* is the label column right\? It is '0'"):
        load_text(write(tmp_path / "swapped.csv", rows))


def test_unclosed_quote_that_swallows_rows(tmp_path):
    """csv reads an unclosed quote up to the next quote or the end of the file: rows inside one field."""
    rows = ["label,text"] + [f"{'pn'[i % 2]},words {i}" for i in range(30)]
    rows[11] = 'p,"words with an open quote'
    with pytest.raises(CCTError, match=r"mid.csv:12: a quoted field runs over 20 lines, 19 of which read as rows"):
        load_text(write(tmp_path / "mid.csv", "\n".join(rows) + "\n"))
    rows[1] = 'n,"open at the first row'  # every other row swallowed: the file seems to hold one label
    with pytest.raises(CCTError, match=r"first.csv:2: a quoted field runs over .* an unclosed quote\?"):
        load_text(write(tmp_path / "first.csv", "\n".join(rows) + "\n"))
    ok = load_text(write(tmp_path / "ok.csv", 'label,text\np,"one\ntwo\nthree\nfour"\nn,b\np,c\n'))
    assert ok.train_texts[0] == "one two three four"  # a real multi-line field stays one text


def test_line_breaks_are_only_newlines(tmp_path):
    """U+2028 and U+0085 are characters of a text (json.dumps(ensure_ascii=False) writes them raw), not line breaks."""
    rows = [json.dumps({"text": f"one\u2028two {i}\u0085", "label": "ab"[i % 2]}, ensure_ascii=False) for i in range(4)]
    ds = load_text(write(tmp_path / "d.jsonl", "\r\n".join(rows) + "\r\n"))
    assert len(ds.train_texts) == 4 and ds.train_texts[0] == "one two 0"


def test_csv_with_semicolons_or_tabs(tmp_path):
    """Excel writes `;` where the decimal mark is a comma: a .csv whose first rows all have ";" and not all ","."""
    path = write(tmp_path / "s.csv", 'label;text\npos;good, very good\nneg;"bad; awful"\npos;fine\n')
    ds = load_text(path)
    assert ds.classes == ["neg", "pos"] and ds.train_texts == ["good, very good", "bad; awful", "fine"]
    ds = load_text(write(tmp_path / "t.csv", "label\ttext\npos\tgood\nneg\tbad\n"))
    assert ds.train_texts == ["good", "bad"]
    ds = load_text(write(tmp_path / "c.csv", "label,text\npos,good; fine\nneg,bad; awful\n"))  # commas on every row win
    assert ds.train_texts == ["good; fine", "bad; awful"]
    images = write(tmp_path / "i.csv", "path;label\na/1.png;cat\na/2.png;cat\n")
    assert detect_kind(images) == "image" and detect_kind(path) == "text"
    assert detect_kind(write(tmp_path / "i.tsv", "a/1.png\tcat\na/2.png\tcat\n")) == "image"


def test_csv_several_text_columns(tmp_path):
    path = write(tmp_path / "d.csv", "label,title,body,id\npos,Good,very good,1\nneg,Bad,awful,2\n")
    ds = read_table(path, text_columns=["title", "body"])
    assert ds.train_texts == ["Good very good", "Bad awful"]


def test_ag_news_layout(tmp_path):
    write(tmp_path / "train.csv", '"3","Wall St. Bears","Short-sellers, Wall Street\'s dwindling band"\n'
                                  '"4","Space","A probe \\ lands"\n"1","World","Talks ""resume"" today"\n'
                                  '"10","Extra","Tenth class"\n')
    write(tmp_path / "test.csv", '"4","Moon","Another landing"\n')
    assert detect_kind(tmp_path) == "text"
    ds = load_text(tmp_path)
    assert ds.classes == ["1", "3", "4", "10"]  # integer labels sort as numbers
    assert ds.train_texts[0] == "Wall St. Bears Short-sellers, Wall Street's dwindling band"
    assert ds.train_texts[2] == 'World Talks "resume" today'
    assert ds.train_labels.tolist() == [1, 2, 0, 3] and ds.test_labels.tolist() == [2]


def test_tsv(tmp_path):
    path = write(tmp_path / "d.tsv", "label\ttext\nx\ta, b\ny\tc\n")
    ds = load_text(path)
    assert ds.train_texts == ["a, b", "c"] and ds.classes == ["x", "y"]


def test_csv_missing_column(tmp_path):
    path = write(tmp_path / "d.csv", "label,text\npos,good\n")
    with pytest.raises(CCTError, match=r"d.csv:1: missing column 'body' \(columns: label, text\)"):
        read_table(path, text_columns=["body"])
    with pytest.raises(CCTError, match=r"d.csv:1: missing column 'y'"):
        read_table(path, label_column="y")


def test_csv_short_row_empty_text_and_unknown_label(tmp_path):
    with pytest.raises(CCTError, match=r"d.csv:3: 1 fields, expected 2"):
        load_text(write(tmp_path / "d.csv", "label,text\npos,good\nneg\n"))
    with pytest.raises(CCTError, match=r"e.csv:3: empty text"):
        load_text(write(tmp_path / "e.csv", 'label,text\npos,good\nneg,"  "\n'))
    write(tmp_path / "ag" / "train.csv", '"1","a"\n"2","b"\n')
    write(tmp_path / "ag" / "test.csv", '"1","a"\n"\n5","c"\n')  # the record starts on line 2
    with pytest.raises(CCTError, match=r"test.csv:2: unknown label '5'"):
        load_text(tmp_path / "ag")


def test_csv_field_over_limit(tmp_path):
    path = write(tmp_path / "d.csv", "label,text\npos,short\nneg," + "x" * 300 + "\n")
    assert len(read_table(path, max_field_chars=1000).train_texts) == 2
    with pytest.raises(CCTError, match=r"d.csv:3: a field is over 100 characters"):
        read_table(path, max_field_chars=100)
    # an unclosed quote swallows the rest of the file into one field
    path = write(tmp_path / "q.csv", 'label,text\npos,"open\n' + "neg,text\n" * 50)
    with pytest.raises(CCTError, match=r"q.csv:2: a field is over 200 characters"):
        read_table(path, max_field_chars=200)


def test_undecodable_bytes_name_the_line(tmp_path):
    with pytest.raises(CCTError, match=r"d.csv:3: undecodable bytes"):
        load_text(write(tmp_path / "d.csv", b"label,text\npos,good\nneg,caf\xe9\n"))
    with pytest.raises(CCTError, match=r"train_5500.label:2: undecodable bytes"):
        load_text(trec(tmp_path / "t", "HUM:ind Who ?\nHUM:ind Wh\xff\xfeo ?\n".encode("latin-1")))


# ---------------------------------------------------------------------- JSON Lines
def test_jsonl_file_and_folder(tmp_path):
    lines = [{"text": "good film", "label": "pos"}, {"text": "bad", "label": "neg", "id": 3}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_text(path)
    assert ds.train_texts == ["good film", "bad"] and ds.classes == ["neg", "pos"]
    write(tmp_path / "f" / "train.jsonl", '{"text": "a", "label": 2}\n{"text": "b", "label": 0}\n')
    write(tmp_path / "f" / "test.jsonl", '{"text": "c", "label": 2}\n')
    ds = load_text(tmp_path / "f")
    assert ds.classes == ["0", "2"] and ds.test_labels.tolist() == [1]


def test_json_suffixes_arrays_and_field_names(tmp_path):
    """`.ndjson` and `.json` (JSON Lines, as `datasets`' to_json writes it, or one array) read as `.jsonl`; fields in
    other words are found as a table header's: SST-2's `sentence`, a `category` with `title` and `description`."""
    rows = [{"sentence": "good film", "label": 1, "idx": 0}, {"sentence": "bad", "label": 0, "idx": 1}]
    for name, text in [("a.ndjson", "\n".join(map(json.dumps, rows))), ("b.json", "\n".join(map(json.dumps, rows))),
                       ("c.json", json.dumps(rows, indent=2))]:
        path = write(tmp_path / name, text)
        assert detect_kind(path) == "text"
        ds = load_text(path)
        assert ds.train_texts == ["good film", "bad"] and ds.classes == ["0", "1"], name
    capitals = write(tmp_path / "caps.jsonl", '{"Text": "fine", "Label": "ok"}\n{"Text": "poor", "Label": "bad"}')
    assert load_text(capitals).train_texts == ["fine", "poor"]
    news = [{"Category": "sport", "title": "Win", "description": "a late goal"}, {"Category": "tech", "title": "Chip",
                                                                                  "description": "faster"}]
    write(tmp_path / "f" / "train.json", "\n".join(map(json.dumps, news)))
    write(tmp_path / "f" / "test.ndjson", json.dumps(news[0]))
    assert detect_kind(tmp_path / "f") == "text"
    ds = load_text(tmp_path / "f")
    assert ds.train_texts == ["Win a late goal", "Chip faster"] and ds.classes == ["sport", "tech"]
    assert ds.test_labels.tolist() == [0]
    with pytest.raises(CCTError, match=r"c.json: record 2: missing field 'sentence'"):
        load_text(write(tmp_path / "c.json", json.dumps([rows[0], {"label": 1}])))
    with pytest.raises(CCTError, match=r"d.json:3: not JSON"):
        load_text(write(tmp_path / "d.json", '[\n {"text": "a", "label": 1},\n x]'))
    with pytest.raises(CCTError, match=r"g.json:1: not JSON .*JSON Lines or one array of objects"):  # one object
        load_text(write(tmp_path / "g.json", json.dumps({"data": rows}, indent=1)))
    with pytest.raises(CCTError, match=r"e.jsonl:1: missing field 'label'"):  # no field a label name calls
        load_text(write(tmp_path / "e.jsonl", json.dumps({"text": "a", "coarse_label": 1})))


@pytest.mark.parametrize("line,why", [
    ('{"text": "a"}', "missing field 'label'"), ('{"label": "x"}', "missing field 'text'"),
    ('{"text": "a", "label": x}', "not JSON"), ('{"text": " ", "label": "x"}', "empty text"),
    ('["a", "x"]', "expected an object"), ('{"text": "a", "label": null}', "'label' must be")])
def test_jsonl_bad_lines(tmp_path, line, why):
    with pytest.raises(CCTError, match=f"a.jsonl:2: {why}"):
        load_text(write(tmp_path / "a.jsonl", '{"text": "ok", "label": "x"}\n' + line + "\n"))


# ---------------------------------------------------------------------- .txt folders and detection
def test_text_folders(tmp_path):
    for split, cls, name, text in [("train", "neg", "1.txt", "awful\n"), ("train", "pos", "2.txt", "great  film"),
                                   ("train", "pos", "3.txt", "fine"), ("test", "neg", "4.txt", "bad")]:
        write(tmp_path / split / cls / name, text)
    assert detect_kind(tmp_path) == "text"
    ds = load_text(tmp_path)
    assert ds.classes == ["neg", "pos"] and ds.train_texts == ["awful", "great film", "fine"]
    assert ds.test_texts == ["bad"] and ds.test_labels.tolist() == [0]
    write(tmp_path / "test" / "meh" / "5.txt", "so so")
    with pytest.raises(CCTError, match=r"5.txt:1: unknown label 'meh'"):
        load_text(tmp_path)
    write(tmp_path / "train" / "pos" / "6.txt", " \n")
    with pytest.raises(CCTError, match=r"6.txt:1: empty text"):
        load_text(tmp_path)


def test_text_folders_in_any_case_nested_and_without_extensions(tmp_path):
    """`.TXT`, sub-folders of a class folder, and 20 Newsgroups' extensionless files are texts; other files are
    noted as left out, hidden ones ignored."""
    for split, cls, name, text in [("train", "neg", "1.TXT", "awful"), ("train", "neg", "sub/2.txt", "poor"),
                                   ("train", "pos", "49960", "great"), ("train", "pos", "3.txt", "fine"),
                                   ("train", "pos", "notes.md", "# not a text"), ("train", "pos", ".DS_Store", "x"),
                                   ("test", "neg", "4.Txt", "bad")]:
        write(tmp_path / split / cls / name, text)
    assert detect_kind(tmp_path) == "text"
    ds = load_text(tmp_path)
    assert ds.train_texts == ["awful", "poor", "fine", "great"] and ds.test_texts == ["bad"]
    assert len(ds.skipped) == 1 and "notes.md: not a .txt file, left out" in ds.skipped[0]


def test_detect_kind(tmp_path):
    Image.new("RGB", (4, 4)).save(write(tmp_path / "img" / "train" / "cat" / "a.png", b""))
    assert detect_kind(tmp_path / "img") == "image"
    Image.new("RGB", (4, 4)).save(write(tmp_path / "flat" / "cat" / "a.png", b""))
    assert detect_kind(tmp_path / "flat") == "image"  # flat class folders
    image_csv = write(tmp_path / "images.csv", "path,label\nimgs/a.png,cat\nimgs/b.jpg,dog\n")
    assert detect_kind(image_csv) == "image"
    assert detect_kind(write(tmp_path / "texts.csv", "label,text\ncat,a photo of a cat\n")) == "text"
    # a text naming a file is text: only the path column (the first) of every row decides
    assert detect_kind(write(tmp_path / "mentions.csv", "label,text\ncat,what is shown in cat.jpg\n")) == "text"
    assert detect_kind(write(tmp_path / "headless.csv", "imgs/a.png,cat\nimgs/b.jpg,dog\n")) == "image"
    assert detect_kind(write(tmp_path / "label-first.csv", "label,path\ncat,imgs/a.png\ndog,b.jpg\n")) == "image"
    assert detect_kind(write(tmp_path / "asks.csv", "label,text\ncat,what is in a.png\ndog,what is in b.jpg\n")) == "text"
    # every extension the image loader reads counts, in any case (.jfif, .jpe, .pnm were missed)
    assert detect_kind(write(tmp_path / "rare.csv", "path,label\nimgs/a.JFIF,cat\nimgs/b.jpe,dog\n")) == "image"
    (tmp_path / "pnm" / "cat").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "pnm" / "cat" / "a.pnm", format="PPM")
    assert detect_kind(tmp_path / "pnm") == "image"
    # a photo tree whose class folder holds a credits file is still images (the first file sorted decided before)
    for k in range(3):
        Image.new("RGB", (4, 4)).save(write(tmp_path / "credited" / "Train" / "cat" / f"IMG_{k}.png", b""))
    write(tmp_path / "credited" / "Train" / "cat" / "ATTRIBUTION.txt", "photos: CC-BY")
    assert detect_kind(tmp_path / "credited") == "image"
    assert detect_kind(write(tmp_path / "stray.csv", "path,label\nimgs/a.png,cat\nnotes.txt,dog\n")) == "image"
    assert detect_kind(write(tmp_path / "few.csv", "label,text\ncat,a.png\ndog,a dog\ncow,a cow\n")) == "text"
    assert detect_kind(write(tmp_path / "x.jsonl", "{}\n")) == "text"
    assert detect_kind(trec(tmp_path / "trec", TREC_TRAIN)) == "text"
    assert detect_kind("cifar10") == "image"
    assert detect_kind(write(tmp_path / "data.tar.gz", b"")) == "image"
    assert detect_kind(tmp_path / "missing") is None
    (tmp_path / "empty").mkdir()
    assert detect_kind(tmp_path / "empty") is None


def test_not_a_text_dataset(tmp_path):
    with pytest.raises(CCTError, match="data not found"):
        load_text(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CCTError, match="not a text dataset"):
        load_text(tmp_path / "empty")


def test_label_level_is_for_trec_only(tmp_path):
    (tmp_path / "t.csv").write_text("label,text\nA,one text\nB,another\n")
    with pytest.raises(CCTError, match=r"--label-level fine is for TREC's COARSE:fine labels; .*t.csv is not a TREC"):
        load_text(tmp_path / "t.csv", label_level="fine")
