import csv
import hashlib
import json
import os

import numpy as np
import pytest
import soundfile as sf

from musiclm.data import storage
from musiclm.data.manifest import (
    Clip,
    ManifestError,
    check_manifest,
    from_csv,
    read_manifest,
    sanitize_id,
    split_for,
    write_manifest,
)


def _wav(path, seconds=0.5, sr=8000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.zeros(int(seconds * sr), dtype=np.float32), sr)
    return path


def _lines(path, objs):
    with open(path, "w") as f:
        for o in objs:
            f.write((o if isinstance(o, str) else json.dumps(o)) + "\n")
    return str(path)


def test_read_resolves_audio_keeps_extra_and_splits(tmp_path):
    _wav(tmp_path / "audio" / "a.wav")
    m = _lines(
        tmp_path / "manifest.jsonl",
        [
            {
                "id": "a",
                "audio": "audio/a.wav",
                "caption": "boom bap",
                "start": 1,
                "end": 2.5,
                "split": "eval",
                "bpm": 90,
            },
            "",
            {"id": "b-2", "audio": "/abs/b.flac", "caption": "trap beat"},
            {"id": "c_3", "audio": "s3://bucket/x/c.wav", "caption": "lofi"},
        ],
    )
    clips = read_manifest(m)
    assert [c.id for c in clips] == ["a", "b-2", "c_3"]
    a, b, c = clips
    assert a.audio == str(tmp_path / "audio" / "a.wav")
    assert (a.start, a.end, a.split, a.extra, a.duration) == (1.0, 2.5, "eval", {"bpm": 90}, 1.5)
    assert b.audio == "/abs/b.flac" and b.start is None and b.split == split_for("b-2")
    assert c.audio == "s3://bucket/x/c.wav"

    out = tmp_path / "copy" / "manifest.jsonl"
    write_manifest(clips, str(out))
    again = read_manifest(str(out))
    assert [(c.id, c.audio, c.caption, c.start, c.end, c.split, c.extra) for c in again] == [
        (c.id, c.audio, c.caption, c.start, c.end, c.split, c.extra) for c in clips
    ]
    # audio under the manifest's folder is written relative to it
    write_manifest(clips, m)
    assert json.loads(open(m).readline())["audio"] == os.path.join("audio", "a.wav")


GOOD = {"id": "x1", "audio": "a.wav", "caption": "c"}


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ('{"id": "x2", "audio": "a.wav", "caption": ', None, "invalid JSON"),
        ('["not", "an", "object"]', None, "JSON object"),
        ({"id": "x2", "audio": "a.wav"}, "caption", "missing"),
        ({"audio": "a.wav", "caption": "c"}, "id", "missing"),
        ({"id": "x2", "caption": "c"}, "audio", "missing"),
        ({"id": "x1", "audio": "b.wav", "caption": "c"}, "id", "duplicate id 'x1' (first on line 1)"),
        ({"id": "x2", "audio": "a.wav", "caption": 3}, "caption", "must be a string, got int"),
        ({"id": "x2", "audio": "a.wav", "caption": "  "}, "caption", "empty"),
        ({"id": 7, "audio": "a.wav", "caption": "c"}, "id", "must be a string"),
        ({"id": "x2", "audio": ["a.wav"], "caption": "c"}, "audio", "must be a string"),
        ({"id": "x2", "audio": "a.wav", "caption": "c", "start": "0"}, "start", "number of seconds"),
        ({"id": "x2", "audio": "a.wav", "caption": "c", "end": -1}, "end", ">= 0"),
        ({"id": "x2", "audio": "a.wav", "caption": "c", "start": 5, "end": 2}, "end", "greater than start"),
        ({"id": "x2", "audio": "a.wav", "caption": "c", "split": 1}, "split", "got 1"),
        ({"id": "song.v2", "audio": "a.wav", "caption": "c"}, "id", "'song.v2' cannot be used in shard keys"),
        ({"id": "my song", "audio": "a.wav", "caption": "c"}, "id", "e.g. 'my_song'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, bad, field, words):
    m = _lines(tmp_path / "manifest.jsonl", [GOOD, bad])
    with pytest.raises(ManifestError) as ei:
        read_manifest(m)
    e = ei.value
    assert (e.path, e.line, e.field) == (m, 2, field)
    prefix = f"{m}:2: " + (f"field '{field}': " if field else "")
    assert str(e).startswith(prefix), str(e)
    assert words in str(e)


def test_split_for_is_stable_sha1_and_about_ten_percent():
    ids = [f"clip{i}" for i in range(20000)]
    splits = [split_for(i) for i in ids]
    assert splits == [split_for(i) for i in ids]
    frac = splits.count("eval") / len(ids)
    assert 0.09 < frac < 0.11
    # defined by sha1: the same on every machine and Python (no PYTHONHASHSEED dependence)
    h = int.from_bytes(hashlib.sha1(b"clip0").digest()[:8], "big") / 2.0**64
    assert split_for("clip0") == ("eval" if h < 0.1 else "train")
    assert split_for("clip0", eval_fraction=0.0) == "train" and split_for("clip0", eval_fraction=1.0) == "eval"


def test_sanitize_id():
    assert sanitize_id("My Beat (final).v2") == "My_Beat_final_v2"
    long = sanitize_id("x" * 200)
    assert len(long) <= 80 and long != sanitize_id("x" * 199)
    assert sanitize_id("__") == "c" and sanitize_id("-0Gj8-vB1q4") == "-0Gj8-vB1q4"


def test_from_csv_files_and_captions(tmp_path):
    _wav(tmp_path / "clips" / "My Beat (final).wav")
    _wav(tmp_path / "clips" / "sub" / "b.flac")
    _wav(tmp_path / "clips" / "other" / "b.flac")
    csv_path = tmp_path / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption", "bpm", "split"])
        w.writerow(["clips/My Beat (final).wav", "dark trap beat", "140", ""])
        w.writerow(["clips/sub/b.flac", "jazzy boom bap", "88", "eval"])
        w.writerow(["clips/other/b.flac", "jazzy boom bap 2", "", ""])
        w.writerow(["clips/missing.wav", "never downloaded", "", ""])
    out = tmp_path / "manifest.jsonl"
    stats = {}
    assert from_csv(str(csv_path), str(out), stats=stats) == 3
    assert stats["skipped_missing"] == 1 and stats["missing"] == ["clips/missing.wav"]
    clips = read_manifest(str(out))
    assert [c.id for c in clips] == ["My_Beat_final", "b", "b_2"]
    assert clips[0].audio == str(tmp_path / "clips" / "My Beat (final).wav")
    assert clips[0].extra == {"bpm": "140"} and clips[0].split == split_for("My_Beat_final")
    assert clips[1].split == "eval"
    with pytest.raises(ManifestError, match=r"captions.csv:5: field 'file': audio file not found"):
        from_csv(str(csv_path), str(out), on_missing="error")
    with pytest.raises(ManifestError, match="no caption column"):
        from_csv(str(csv_path), str(out), caption_column="text")


def test_from_csv_musiccaps(tmp_path):
    audio = tmp_path / "musiccaps"
    _wav(audio / "-0Gj8-vB1q4.wav", seconds=0.5)  # already the excerpt
    _wav(audio / "nested" / "Some title [AbC_123xyz9].flac", seconds=0.5)
    _wav(audio / "full00video.wav", seconds=5.0, sr=2000)  # the whole video: cut start/end from it
    csv_path = tmp_path / "musiccaps-public.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "ytid",
                "start_s",
                "end_s",
                "audioset_positive_labels",
                "aspect_list",
                "caption",
                "author_id",
                "is_balanced_subset",
                "is_audioset_eval",
            ]
        )
        w.writerow(
            [
                "-0Gj8-vB1q4",
                "30",
                "40",
                "/m/0140xf",
                "['low quality']",
                "The low quality recording...",
                "4",
                "False",
                "True",
            ]
        )
        w.writerow(["AbC_123xyz9", "0", "10", "", "['rap']", "A rap beat.", "1", "False", "False"])
        w.writerow(["full00video", "1", "2", "", "['jazz']", "Jazz trio.", "2", "False", "False"])
        w.writerow(["notdownload", "0", "10", "", "[]", "Missing.", "3", "False", "False"])
    out = tmp_path / "manifest.jsonl"
    stats = {}
    assert from_csv(str(csv_path), str(out), audio_dir=str(audio), stats=stats) == 3
    assert stats["missing"] == ["notdownload"]
    clips = {c.id: c for c in read_manifest(str(out))}
    trimmed = clips["-0Gj8-vB1q4"]
    assert trimmed.audio == str(audio / "-0Gj8-vB1q4.wav") and trimmed.start is None
    assert trimmed.extra["yt_start"] == 30.0 and trimmed.extra["aspect_list"] == "['low quality']"
    assert trimmed.extra["source"] == "youtube:-0Gj8-vB1q4"
    assert clips["AbC_123xyz9"].audio.endswith("Some title [AbC_123xyz9].flac")
    assert (clips["full00video"].start, clips["full00video"].end) == (1.0, 2.0)
    with pytest.raises(ManifestError, match="needs audio_dir"):
        from_csv(str(csv_path), str(out))
    with pytest.raises(ManifestError, match=r":5: field 'ytid': no audio file for 'notdownload'"):
        from_csv(str(csv_path), str(out), audio_dir=str(audio), on_missing="error")


def test_check_manifest(tmp_path):
    _wav(tmp_path / "a.wav", seconds=2.0)
    _wav(tmp_path / "b.wav", seconds=4.0)
    m = _lines(
        tmp_path / "manifest.jsonl",
        [
            {"id": "a", "audio": "a.wav", "caption": "one two three", "split": "train"},
            {"id": "b", "audio": "b.wav", "caption": "four", "start": 1.0, "split": "eval"},
            {"id": "c", "audio": "c.wav", "caption": "gone", "split": "train"},
        ],
    )
    s = check_manifest(m)
    assert s["clips"] == 3 and s["splits"] == {"eval": 1, "train": 2}
    assert not s["ok"] and s["missing_audio"] == 1 and s["missing"] == ["c"]
    assert s["hours"] == pytest.approx(5.0 / 3600, abs=1e-4) and s["hours_known_for"] == 2
    assert s["captions"]["max_words"] == 3
    assert check_manifest(m, check_audio=False)["missing_audio"] == 0


def test_manifest_on_s3(moto_s3):
    url = f"{moto_s3}/corpus/manifest.jsonl"
    write_manifest([Clip(id="a", audio=f"{moto_s3}/corpus/audio/a.wav", caption="c", split="train")], url)
    raw = json.loads(storage.read_bytes(url))
    assert raw["audio"] == "audio/a.wav"  # relative to the manifest, like local ones
    [clip] = read_manifest(url)
    assert clip.audio == f"{moto_s3}/corpus/audio/a.wav"
