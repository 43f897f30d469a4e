"""The input formats' driver side, without Ray: listing image files, reading tar shards (and
their damage), ids and the id policy, reading by reference, the staged listing and the
incremental bookkeeping for files. tests/test_input_formats.py runs them through the job."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import InputConfig
from pipeline.io import formats
from pipeline.io.fetch import ObjectReader, fetch_images, object_reader
from pipeline.io.inputs import (
    InputError, first_of_repeated, keep_first_of_repeated, plan_input, read_staged_listing, stage_listing,
)
from pipeline.io.manifest import write_manifest
from pipeline.io.runs import NothingToRun, plan_incremental
from pipeline.io.storage import locate
from pipeline.config import StorageConfig

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=timezone.utc)
EXT = InputConfig(path="x").extensions


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _inputs(path: object, **fields: object) -> InputConfig:
    return InputConfig(path=path, prompt="Describe the image.", **fields)


def test_files_are_listed_with_ids_relative_to_their_prefix_without_the_extension(tmp_path: Path) -> None:
    for name in ("b/2.png", "a.JPG", "c.webp", "notes.txt", "_staging/x.png", ".hidden.png", "sub/.x/y.png",
                 "deep/er/z.jpeg"):
        (tmp_path / "p" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "p" / name).write_bytes(b"x")
    listing = formats.list_files([locate(str(tmp_path / "p"))], EXT)
    assert listing.column("id").to_pylist() == ["a", "b/2", "c", "deep/er/z"]
    assert listing.column("image").to_pylist() == [str(tmp_path / "p" / n) for n in ("a.JPG", "b/2.png", "c.webp",
                                                                                   "deep/er/z.jpeg")]
    only_png = formats.list_files([locate(str(tmp_path / "p"))], InputConfig(path="x", extensions=[".PNG"]).extensions)
    assert only_png.column("id").to_pylist() == ["b/2"]
    assert formats.list_files([locate(str(tmp_path / "missing"))], EXT).num_rows == 0


def test_a_key_in_two_prefixes_follows_the_id_policy(tmp_path: Path) -> None:
    for root in ("p1", "p2"):
        for name in ("same.png", f"only-{root}.png"):
            (tmp_path / root).mkdir(exist_ok=True)
            (tmp_path / root / name).write_bytes(root.encode())
    roots = [locate(str(tmp_path / "p1")), locate(str(tmp_path / "p2"))]
    with pytest.raises(InputError, match=r"1 id\(s\) repeated over 2 rows \(e.g. 'same'\)"):
        plan_input(_inputs([str(tmp_path / "p1"), str(tmp_path / "p2")], format="files"), roots)
    plan = plan_input(_inputs([str(tmp_path / "p1"), str(tmp_path / "p2")], format="files", id_policy="drop_duplicates"),
                      roots)
    assert (plan.rows, plan.expected_rows, plan.dropped) == (4, 3, {"repeated id": 1})
    first = first_of_repeated(plan)
    assert first == {"same": str(tmp_path / "p1" / "same.png")}  # prefixes in the order configured
    kept = keep_first_of_repeated(plan.listing, first)
    assert sorted(kept.column("id").to_pylist()) == ["only-p1", "only-p2", "same"]
    assert str(tmp_path / "p2" / "same.png") not in kept.column("image").to_pylist()


def test_inputs_without_prompts_need_input_prompt_or_a_task_spec(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.png").write_bytes(b"x")
    with pytest.raises(InputError, match="set input.prompt"):
        plan_input(InputConfig(path=str(tmp_path / "p"), format="files"), [locate(str(tmp_path / "p"))])
    with pytest.raises(InputError, match=r"tasks.0.prompt names column 'shape'"):
        plan_input(InputConfig(path=str(tmp_path / "p"), format="files"), [locate(str(tmp_path / "p"))],
                   text_columns={"shape": "tasks.0.prompt"})
    with pytest.raises(InputError, match="no image files"):
        plan_input(_inputs(str(tmp_path / "p"), format="files", extensions=["jpg"]), [locate(str(tmp_path / "p"))])


def test_tar_samples_group_members_and_a_cut_member_ends_the_shard_as_an_error_row(tmp_path: Path) -> None:
    members = []
    for key in ("k1", "k2", "k3"):
        members += [(f"{key}.jpg", b"J" * 700), (f"{key}.txt", f"text {key}".encode()), (f"{key}.json", b"{}")]
    raw = _tar(tmp_path / "good.tar", members)
    samples = list(formats.tar_samples(io.BytesIO(raw), EXT, "good.tar"))
    assert [(s.key, s.image_member, len(s.image), s.error) for s in samples] == [
        (k, f"{k}.jpg", 700, "") for k in ("k1", "k2", "k3")]
    assert samples[1].texts == {"txt": b"text k2", "json": b"{}"}
    # Cut inside k2.jpg's data: k1 whole, k2 an error row, nothing after (a tar has no index).
    cut = raw[: 3 * 512 + 2 * 512 + 1024 + 512 + 300]
    samples = list(formats.tar_samples(io.BytesIO(cut), EXT, "cut.tar"))
    assert [s.key for s in samples] == ["k1", "k2", ""]
    assert samples[0].error == "" and samples[0].image == b"J" * 700
    assert samples[1].image is None and samples[1].error.startswith("corrupt image: cut.tar: member k2.jpg is cut short")
    assert samples[2].key == "" and "cut short in member k2.jpg" in samples[2].error  # the plan's warning
    # Cut in a header, or between members: tarfile reads either as the end; the missing end-of-archive
    # blocks say otherwise. The last sample may lack members: an error row, then the warning.
    for end in (3 * 512 + 2 * 512 + 1024 + 100, 3 * 512 + 2 * 512 + 1024):
        samples = list(formats.tar_samples(io.BytesIO(raw[:end]), EXT, "h.tar"))
        assert [s.key for s in samples] == ["k1", ""]
        assert samples[0].image is None and "h.tar is cut short after member k1.json" in samples[0].error
        assert "no end-of-archive blocks" in samples[1].error
    assert list(formats.tar_samples(io.BytesIO(b"not a tar at all" * 40), EXT, "x.tar"))[0].error.startswith(
        "corrupt image: x.tar")


def test_shard_index_text_columns_damage_and_repeated_keys(tmp_path: Path) -> None:
    _tar(tmp_path / "w" / "00000.tar", [("a.jpg", b"1"), ("a.txt", b"alpha"), ("a.cls", b"\xff\xfe"),
                                        ("b.png", b"2"), ("b.txt", b"beta"), ("a.png", b"again")])
    raw = _tar(tmp_path / "w" / "00001.tar", [("a.jpg", b"3"), ("c.jpg", b"4" * 2000), ("d.jpg", b"5")])
    (tmp_path / "w" / "00001.tar").write_bytes(raw[: 512 * 3 + 700])  # c.jpg cut short
    _tar(tmp_path / "w" / "00002.tar", [("readme.md", b"no images here")])
    (tmp_path / "w" / "_tmp.tar").write_bytes(b"skipped")
    root = locate(str(tmp_path / "w"))
    assert formats.list_tar_shards(root) == ["00000.tar", "00001.tar", "00002.tar"]
    with pytest.raises(InputError, match=r"repeated over 3 rows \(e.g. 'a'\)"):
        plan_input(_inputs(str(tmp_path / "w"), format="webdataset"), [root])
    plan = plan_input(_inputs(str(tmp_path / "w"), format="webdataset", id_policy="drop_duplicates"), [root])
    assert plan.listing.column("id").to_pylist() == ["a", "b", "a", "a", "c", "readme"]
    assert plan.columns == ["id", "image", "md", "txt"]  # .cls is not UTF-8 text: left out, said in problems
    assert any("cls" in p for p in plan.problems)
    # The later shard's `a` is skipped by name; the same shard's second `a` by the reader (first kept).
    assert plan.skip == {"00001.tar": ["a"]} and plan.dropped == {"repeated id": 2}
    rows = _read_shards(root, plan)
    assert [(r["id"], r["image"], r["txt"]) for r in rows[:2]] == [("a", b"1", "alpha"), ("b", b"2", "beta")]
    assert [r["id"] for r in rows] == ["a", "b", "c", "readme"] and rows[2]["image"] is None  # d: after the cut
    assert rows[2]["image_error"].startswith("corrupt image: 00001.tar: member c.jpg is cut short")
    assert rows[3]["image_error"].startswith("missing image: no member with an image extension")
    errors = dict(zip(plan.listing.column("id").to_pylist(), plan.listing.column("error").to_pylist(), strict=True))
    assert errors["c"].startswith("corrupt image: 00001.tar: member c.jpg is cut short")
    # Staged and read back: the same plan, without reading a shard again.
    out = locate(str(tmp_path / "out"))
    stage_listing(plan, out)
    for f in (tmp_path / "w").glob("*.tar"):
        f.unlink()
    again = plan_input(_inputs(str(tmp_path / "w"), format="webdataset", id_policy="drop_duplicates"), [root],
                       staged=read_staged_listing(out))
    assert (again.rows, again.columns, again.skip, again.problems, again.files) == (
        plan.rows, plan.columns, plan.skip, plan.problems, plan.files)


def test_a_reference_reads_as_bytes_or_an_error_row(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(b"P" * 100)
    (tmp_path / "img" / "big.png").write_bytes(b"B" * 101)
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    reader = object_reader(StorageConfig(), InputConfig(path="x", image_column="ref", image_root=str(tmp_path / "img"),
                                                        max_image_bytes=100))
    assert reader.read("ok.png") == (b"P" * 100, "")
    assert reader.read(str(tmp_path / "img" / "ok.png")) == (b"P" * 100, "")
    assert reader.read("empty.png") == (b"", "")  # decoding says `missing image: 0 bytes`
    data, error = reader.read("big.png")
    assert data is None and error.startswith("image too large:") and "input.max_image_bytes = 100" in error
    assert reader.read("gone.png")[1].startswith("missing image: not found:")
    assert reader.read(str(tmp_path / "img"))[1].startswith("missing image: unreadable:")
    assert reader.read(None) == (None, "missing image: no reference")
    rootless = ObjectReader(locate("s3://"), locate("/"))
    assert "neither a URI nor an absolute path" in rootless.read("ok.png")[1]

    batch = pa.table({"id": ["1", "2"], "ref": ["ok.png", "gone.png"], "prompt": ["p", "q"]})
    out = fetch_images(batch, reader, "ref")
    assert out.column_names == ["id", "ref", "prompt", "image", "image_error"]  # the reference passes through
    assert out.column("image").to_pylist()[0] == b"P" * 100 and out.column("image").to_pylist()[1] is None
    assert out.column("image_error").to_pylist()[0] == ""
    listing = pa.table({"id": ["1"], "image": [str(tmp_path / "img" / "ok.png")]})
    assert fetch_images(listing, reader, "image").column_names == ["id", "image", "image_error"]


def test_incremental_files_take_only_new_files_and_an_unfinished_run_first(tmp_path: Path) -> None:
    corpus, out = tmp_path / "photos", locate(str(tmp_path / "runs"))
    corpus.mkdir()
    for i in range(3):
        (corpus / f"day1-{i}.jpg").write_bytes(b"x")
    inputs = _inputs(str(corpus), format="files")
    roots = [locate(str(corpus))]
    first = plan_incremental(inputs, roots, out, now=NOW)
    assert (first.shards, first.listing.num_rows, first.resumed, first.shards_taken_before) == (None, 3, False, 0)
    _record_run(first, "completed", inputs, roots)

    for i in range(2):
        (corpus / f"day2-{i}.jpg").write_bytes(b"x")
    second = plan_incremental(inputs, roots, out, now=NOW.replace(day=8))
    assert second.listing.column("id").to_pylist() == ["day2-0", "day2-1"] and second.shards_taken_before == 3
    _record_run(second, "running", inputs, roots)  # killed mid-way
    (corpus / "day3-0.jpg").write_bytes(b"x")
    third = plan_incremental(inputs, roots, out, now=NOW.replace(day=9))
    assert third.resumed and third.output.uri == second.output.uri and third.listing is None  # its staged listing
    _record_run(second, "completed", inputs, roots)
    fourth = plan_incremental(inputs, roots, out, now=NOW.replace(day=10))
    assert fourth.listing.column("id").to_pylist() == ["day3-0"] and fourth.shards_taken_before == 5
    _record_run(fourth, "completed", inputs, roots)
    with pytest.raises(NothingToRun, match="no new image files under .*: all 6 were taken by the 3 run"):
        plan_incremental(inputs, roots, out, now=NOW.replace(day=11))
    with pytest.raises(Exception, match="input.format: webdataset, but .* read files"):
        plan_incremental(_inputs(str(corpus), format="webdataset"), roots, out, now=NOW.replace(day=11))


def _record_run(run: object, status: str, inputs: InputConfig, roots: list) -> None:
    """What the job leaves under a run: the staged listing, then the manifest."""
    plan = plan_input(inputs, roots, run.listing, staged=read_staged_listing(run.output))
    stage_listing(plan, run.output)
    write_manifest(run.output, {"status": status, "attempt": 1, "input": {"format": "files", "rows": plan.rows}})
    (Path(run.output.uri) / "part-0.parquet").write_bytes(b"rows")
    assert json.loads((Path(run.output.uri) / "_manifest.json").read_text())["status"] == status


def _read_shards(root: object, plan: object) -> list[dict]:
    """What the tar reader yields for the plan (``TarShards`` reads each shard with ``shard_rows``)."""
    prefix = root.path.rstrip("/") + "/"
    rows = []
    for path in plan.files:
        shard = path[len(prefix):]
        with root.fs.open_input_stream(path) as f:
            blocks = formats.shard_rows(f, shard, EXT, plan.columns[2:], frozenset(plan.skip.get(shard, ())))
            rows += [r for block in blocks for r in block.to_pylist()]
    return rows
