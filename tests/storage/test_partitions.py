"""Reading a table in bounded chunks, whether it is a frame or a folder of parquet parts."""

from __future__ import annotations

import pandas as pd
import pytest

from dashclip_core.storage.partitions import PartWriter, frame_chunks, select_rows


@pytest.fixture
def table(tmp_path):
    frame = pd.DataFrame({"product_id": [f"p{i}" for i in range(23)], "n": range(23)})
    with PartWriter(tmp_path / "t.parquet") as writer:
        for start in range(0, 23, 10):  # parts of 10, 10, 3 rows
            writer.write(frame.iloc[start:start + 10])
    return frame, tmp_path / "t.parquet"


@pytest.mark.parametrize("source", ["frame", "parts"])
def test_frame_chunks_are_bounded_and_give_the_rows_in_order(table, source):
    frame, path = table
    chunks = list(frame_chunks(frame if source == "frame" else path, 4, columns=["product_id"]))
    assert max(len(c) for c in chunks) <= 4 and list(chunks[0].columns) == ["product_id"]
    assert pd.concat(chunks)["product_id"].tolist() == frame["product_id"].tolist()


@pytest.mark.parametrize("source", ["frame", "parts"])
def test_select_rows_keeps_the_rows_a_mask_picks_in_table_order(table, source):
    frame, path = table
    kept = select_rows(frame if source == "frame" else path, 4, lambda c: c["n"] % 5 == 0)
    assert kept["n"].tolist() == [0, 5, 10, 15, 20] and kept.index.tolist() == list(range(5))
    assert select_rows(frame if source == "frame" else path, 4, lambda c: c["n"] < 0).empty


def test_a_bad_chunk_size_is_refused(table):
    with pytest.raises(ValueError, match="chunk_rows"):
        list(frame_chunks(table[0], 0))
