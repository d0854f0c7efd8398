"""storage/images.py: every image read checks roots, file type, bytes, pixels and time before decoding."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import time
from pathlib import Path

import pytest

from dashclip_core.storage.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_TIMEOUT_S,
    ImagePolicy,
    ImageRejected,
    InlineImage,
    PixelBudget,
    check_image,
    open_image,
    read_image_bytes,
)


def png_bytes(size=(16, 12), colour=(10, 200, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size=(64, 48)) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An allowed root holding good.png; tmp_path itself (its parent) is not allowed."""
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "good.png").write_bytes(png_bytes())
    return folder


def policy_for(root: Path, **limits) -> ImagePolicy:
    return ImagePolicy.from_roots([root], **{"timeout_s": 5.0, **limits})


def rejected(source, policy) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        open_image(source, policy)
    return info.value


def test_good_image_inside_the_root_decodes(root):
    im = open_image(str(root / "good.png"), policy_for(root))
    assert im.size == (16, 12) and im.getpixel((0, 0)) == (10, 200, 30)
    assert open_image(f"file://{root / 'good.png'}", policy_for(root)).size == (16, 12)


def test_dev_zero_is_refused_without_reading():
    policy = ImagePolicy.from_roots(["/dev"], timeout_s=5.0)
    start = time.monotonic()
    err = rejected("/dev/zero", policy)
    assert err.reason_code == "image_not_a_file" and "character device" in err.detail
    assert time.monotonic() - start < 2


def test_fifo_does_not_hang(root):
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    start = time.monotonic()
    err = rejected(str(fifo), policy_for(root, timeout_s=2.0))
    assert err.reason_code == "image_not_a_file" and "FIFO" in err.detail
    assert time.monotonic() - start < 1.5  # refused by the stat, not by the deadline


def test_directory_is_not_a_file(root):
    (root / "dir.png").mkdir()
    assert rejected(str(root / "dir.png"), policy_for(root)).reason_code == "image_not_a_file"


def test_dotdot_escape_is_refused(root, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    uri = f"{root}/../secret.png"
    err = rejected(uri, policy_for(root))
    assert err.reason_code == "image_outside_roots"
    assert err.uri == uri and str(tmp_path / "secret.png") in err.detail  # names what it resolved to


def test_symlink_inside_the_root_cannot_point_out(root, tmp_path):
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert rejected(str(root / "link.png"), policy_for(root)).reason_code == "image_outside_roots"
    (root / "inner.png").symlink_to(root / "good.png")  # a link that stays inside is fine
    assert open_image(str(root / "inner.png"), policy_for(root)).size == (16, 12)


def test_root_itself_behind_a_symlink_still_works(root, tmp_path):
    (tmp_path / "alias").symlink_to(root)
    assert open_image(str(root / "good.png"), ImagePolicy.from_roots([tmp_path / "alias"])).size == (16, 12)


def test_absolute_path_outside_roots_and_relative_paths_are_refused(root, tmp_path):
    (tmp_path / "other.png").write_bytes(png_bytes())
    assert rejected(str(tmp_path / "other.png"), policy_for(root)).reason_code == "image_outside_roots"
    assert rejected("good.png", policy_for(root)).reason_code == "image_outside_roots"  # relative: never against the cwd
    assert rejected("http://example.com/x.png", policy_for(root)).reason_code == "image_outside_roots"
    # a sibling folder whose name extends the root's is not inside it
    (tmp_path / "catalog-evil").mkdir()
    (tmp_path / "catalog-evil" / "x.png").write_bytes(png_bytes())
    assert rejected(str(tmp_path / "catalog-evil" / "x.png"), policy_for(root)).reason_code == "image_outside_roots"


def test_no_roots_means_no_local_path(root):
    assert rejected(str(root / "good.png"), ImagePolicy.from_roots([])).reason_code == "image_outside_roots"


def test_missing_file(root):
    err = rejected(str(root / "gone.png"), policy_for(root))
    assert err.reason_code == "image_not_found"


def test_byte_cap(root):
    data = png_bytes((64, 64))
    (root / "big.png").write_bytes(data)
    err = rejected(str(root / "big.png"), policy_for(root, max_bytes=len(data) - 1))
    assert err.reason_code == "image_too_large" and str(len(data)) in err.detail
    assert open_image(str(root / "big.png"), policy_for(root, max_bytes=len(data))).size == (64, 64)
    assert rejected(InlineImage(data, "inline"), policy_for(root, max_bytes=10)).reason_code == "image_too_large"


def test_huge_dimensions_in_a_small_file_are_refused_before_decoding(root):
    from PIL import Image

    path = root / "bomb.png"
    Image.new("1", (12000, 10000)).save(path)  # 120 Mpx, a few KB on disk
    assert path.stat().st_size < 100_000
    start = time.monotonic()
    err = rejected(str(path), policy_for(root))
    assert err.reason_code == "image_too_many_pixels" and "12000x10000" in err.detail
    assert time.monotonic() - start < 1.0  # the header alone, never the 120 M pixels
    # Beyond PIL's own limit the header check already raises DecompressionBombError: the same code.
    Image.new("1", (20000, 10000)).save(root / "bomb2.png")
    assert rejected(str(root / "bomb2.png"), policy_for(root, max_pixels=10**12)).reason_code == "image_too_many_pixels"


def test_truncated_jpeg_and_png_are_unreadable(root):
    data = jpeg_bytes((256, 192))
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])
    err = rejected(str(root / "cut.jpg"), policy_for(root))
    assert err.reason_code == "image_unreadable" and "truncated" in err.detail
    assert check_image(str(root / "cut.jpg"), policy_for(root)).reason_code == "image_unreadable"  # draft mode still finds it
    assert check_image(str(root / "good.png"), policy_for(root)) is None
    (root / "full.jpg").write_bytes(data)
    assert check_image(str(root / "full.jpg"), policy_for(root)) is None


def test_non_image_bytes_and_refused_formats(root):
    (root / "text.png").write_bytes(b"not an image at all" * 20)
    err = rejected(str(root / "text.png"), policy_for(root))
    assert err.reason_code == "image_unreadable" and "not a recognised image format" in err.detail
    (root / "doc.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")  # PIL would start Ghostscript
    assert rejected(str(root / "doc.eps"), policy_for(root)).reason_code == "image_unreadable"


def test_inline_bytes_decode_and_name_their_label(root):
    assert open_image(InlineImage(png_bytes(), "row 0"), ImagePolicy.from_roots([])).size == (16, 12)
    err = rejected(InlineImage(b"junk" * 10, "product 'p1' field image_b64"), ImagePolicy.from_roots([]))
    assert err.uri == "product 'p1' field image_b64" and "image_b64" in str(err)
    assert base64  # (the pyfunc tests send real base64)


def test_read_that_never_ends_times_out(root, monkeypatch):
    from dashclip_core.storage import images

    def stuck(path, policy):
        time.sleep(30)

    monkeypatch.setattr(images, "_read_local", stuck)
    start = time.monotonic()
    err = rejected(str(root / "good.png"), policy_for(root, timeout_s=0.5))
    assert err.reason_code == "image_timeout" and time.monotonic() - start < 3


def test_pixel_budget_serialises_large_decodes():
    budget = PixelBudget(100)
    budget.acquire(100)
    import threading

    got = threading.Event()
    threading.Thread(target=lambda: (budget.acquire(50), got.set()), daemon=True).start()
    assert not got.wait(0.2)
    budget.release(100)
    assert got.wait(2)


def test_reason_message_names_code_and_uri():
    err = ImageRejected("image_too_large", "30 bytes > max 10 bytes", "/x/y.png")
    assert str(err) == "image too large (image_too_large): '/x/y.png': 30 bytes > max 10 bytes"
    with pytest.raises(ValueError):
        ImageRejected("no_such_code", "x")
    import pickle

    again = pickle.loads(pickle.dumps(err))  # how a Ray worker's exception reaches the driver
    assert (again.reason_code, again.detail, again.uri, str(again)) == (err.reason_code, err.detail, err.uri, str(err))


def test_defaults_match_the_config_defaults():
    from dashclip_core.config import CatalogConfig

    cat = CatalogConfig()
    assert (cat.max_image_bytes, cat.max_image_pixels, cat.image_read_timeout_s) == (DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT_S)
    assert cat.image_roots == ()


def test_pipeline_policy_comes_from_the_config(tmp_path, dashclip_home):
    from dashclip_core.config import PipelineConfig

    demo = ImagePolicy.for_pipeline(PipelineConfig())
    assert demo.local_roots == (os.path.realpath(PipelineConfig().catalog_dir()),)
    assert demo.s3_prefixes == () and demo.max_pixels == DEFAULT_MAX_PIXELS
    cfg = PipelineConfig.from_dict({
        "catalog": {"source": "sql", "db_url": f"sqlite:///{tmp_path / 'db' / 'catalog.db'}",
                    "image_roots": [str(tmp_path / "photos"), "s3://bucket-x/images/"], "max_image_pixels": 1000},
        "storage": {"s3_endpoint_url": "http://127.0.0.1:9"},
    })
    policy = ImagePolicy.for_pipeline(cfg)
    assert set(policy.local_roots) == {os.path.realpath(tmp_path / "photos"), os.path.realpath(tmp_path / "db")}
    assert policy.s3_prefixes == ("s3://bucket-x/images",)
    assert policy.max_pixels == 1000 and policy.s3_endpoint_url == "http://127.0.0.1:9"
    grocery = ImagePolicy.for_pipeline(dataclasses.replace(PipelineConfig(), catalog=dataclasses.replace(PipelineConfig().catalog, source="grocery")))
    assert os.path.realpath(PipelineConfig().grocery_root()) in grocery.local_roots


def test_serving_policy_reads_the_environment(root, monkeypatch):
    monkeypatch.delenv("DASHCLIP_SERVING_IMAGE_ROOTS", raising=False)
    assert ImagePolicy.for_serving().local_roots == () and ImagePolicy.for_serving().s3_prefixes == ()
    monkeypatch.setenv("DASHCLIP_SERVING_IMAGE_ROOTS", f"{root}{os.pathsep}s3://served-images")
    policy = ImagePolicy.for_serving()
    assert policy.local_roots == (os.path.realpath(root),) and policy.s3_prefixes == ("s3://served-images",)


# ---- S3 (moto server) ----------------------------------------------------------------------------


@pytest.fixture
def s3_images(s3_endpoint):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="catalog-images")
    client.create_bucket(Bucket="other-bucket")
    client.put_object(Bucket="catalog-images", Key="images/p1.png", Body=png_bytes())
    client.put_object(Bucket="catalog-images", Key="images/big.png", Body=png_bytes((256, 256), (1, 2, 3)) + b"\0" * 5000)
    client.put_object(Bucket="catalog-images", Key="images/junk.png", Body=b"junk" * 50)
    client.put_object(Bucket="other-bucket", Key="images/p1.png", Body=png_bytes())
    return s3_endpoint


def test_s3_images_read_under_their_prefix(s3_images):
    policy = ImagePolicy.from_roots(["s3://catalog-images/images"], s3_endpoint_url=s3_images, timeout_s=10.0)
    assert open_image("s3://catalog-images/images/p1.png", policy).size == (16, 12)
    assert rejected("s3://other-bucket/images/p1.png", policy).reason_code == "image_outside_roots"
    assert rejected("s3://catalog-images/imagesX/p1.png", policy).reason_code == "image_outside_roots"
    assert rejected("s3://catalog-images/images/../secret.png", policy).reason_code == "image_outside_roots"
    assert rejected("s3://catalog-images/images/none.png", policy).reason_code == "image_not_found"
    assert rejected("s3://catalog-images/images/junk.png", policy).reason_code == "image_unreadable"
    err = rejected("s3://catalog-images/images/big.png", dataclasses.replace(policy, max_bytes=2000))
    assert err.reason_code == "image_too_large"
    assert len(read_image_bytes("s3://catalog-images/images/p1.png", policy)) == len(png_bytes())


def test_s3_endpoint_that_does_not_answer_times_out():
    import socket

    with socket.socket() as listener:  # accepts TCP connections but never answers HTTP
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        policy = ImagePolicy.from_roots(["s3://catalog-images"], s3_endpoint_url=endpoint, timeout_s=1.0)
        start = time.monotonic()
        err = rejected("s3://catalog-images/images/p1.png", policy)
        assert err.reason_code == "image_timeout" and time.monotonic() - start < 5


# ---- the readers that go through the policy ----------------------------------------------------------


def test_model_pixel_loading_goes_through_the_policy(root, tmp_path):
    from dashclip_core.models.towers import load_pixels

    os.mkfifo(root / "pipe.png")
    pixels, has_image = load_pixels(str(root / "good.png"), 8, "vit-tiny")
    assert pixels.shape == (3, 8, 8) and has_image
    start = time.monotonic()
    for path, code in (("/dev/zero", "image_not_a_file"), (str(root / "pipe.png"), "image_not_a_file")):
        with pytest.raises(ImageRejected) as info:
            load_pixels(path, 8, "vit-tiny")  # the default trusted-input policy still refuses non-files
        assert info.value.reason_code == code
    assert time.monotonic() - start < 3
    (tmp_path / "outside.png").write_bytes(png_bytes())
    with pytest.raises(ImageRejected, match="image_outside_roots"):
        load_pixels(str(tmp_path / "outside.png"), 8, "vit-tiny", policy_for(root))
    assert load_pixels(InlineImage(png_bytes(), "inline"), 8, "vit-tiny")[1]


def test_plot_thumbnails_never_hang_on_a_fifo_or_dev_zero(root, tmp_path):
    import pandas as pd

    from dashclip_core.evaluation.plots import plot_query_results

    os.mkfifo(root / "pipe.png")
    products = pd.DataFrame({"product_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
                             "image_uri": [str(root / "good.png"), str(root / "pipe.png"), "/dev/zero", str(tmp_path / "x.png")]})
    judgments = pd.DataFrame({"query": ["q"], "product_id": ["a"], "label": [2]})
    start = time.monotonic()
    out = plot_query_results({"q": ["a", "b", "c", "d"]}, products, judgments, tmp_path / "grid.png", top=4,
                             images=policy_for(root, timeout_s=2.0))
    assert out.exists() and out.stat().st_size > 0 and time.monotonic() - start < 20
