"""Decoded images shared by the trials of one worker (decoded_images.DecodedImages, resources.image_cache_mb):
the next trial decodes nothing, and every trial's results are what they are without the cache."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import run_cli, small_sweep_overrides
from yolotune.layout import read_jsonl
from yolotune.decoded_images import DecodedImages

SHARED_LINE = re.compile(r"yolotune: (\d+) of (\d+) images decoded by an earlier trial of this worker")


def sweep(storage, shapes_cache, name: str, image_cache_mb: int):
    """2 trials one after the other in one worker (ASHA may stop the second after an epoch), with
    mosaic on in every epoch (it draws from Ultralytics' image buffer)."""
    overrides = small_sweep_overrides(storage, shapes_cache, name, iterations=2, epochs=2)
    proc = run_cli(*overrides, "close_mosaic=0", "resources.cpu_per_trial=2", "resources.max_concurrent_trials=1",
                   f"resources.image_cache_mb={image_cache_mb}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = sorted((storage / name).glob("trial_*"))  # trial ids are numbered in the order they started
    histories = [read_jsonl(t / "history.jsonl")[0] for t in trials]
    assert len(trials) == 2 and len({row["pid"] for h in histories for row in h}) == 1  # one worker ran both
    shared = [[tuple(map(int, m.groups())) for m in SHARED_LINE.finditer((t / "train.log").read_text())]
              for t in trials]
    return histories, shared


@pytest.mark.slow
def test_the_next_trial_decodes_nothing_and_results_do_not_change(tmp_path, shapes_cache):
    cached, shared = sweep(tmp_path, shapes_cache, "cached", 1024)
    plain, not_shared = sweep(tmp_path, shapes_cache, "plain", 0)
    # The first trial decoded the 32 train and 16 val images; the second took all of them from it.
    assert shared == [[(0, 32), (0, 16)], [(32, 32), (16, 16)]]
    assert not_shared == [[], []]  # off: nothing is held, nothing said
    keys = ("epoch", "train/box_loss", "train/cls_loss", "val/box_loss", "fitness")
    assert [[{k: row[k] for k in keys} for row in h] for h in cached] == \
           [[{k: row[k] for k in keys} for row in h] for h in plain]


def fake_dataset(name: str, images: int, nbytes: int):
    decoded = []

    def load(i, rect_mode=True, resize_short=False):
        decoded.append(i)
        return np.zeros(nbytes, np.uint8), (1, 1), (1, 1)

    return SimpleNamespace(im_files=[f"{name}/{i}.jpg" for i in range(images)], imgsz=64, cv2_flag=1, ni=images,
                           cache=None, augment=True, ims=[None] * images, _load_image_uncached=load), decoded


def test_the_cache_stays_within_its_limit_and_stops_decoding_once_full():
    cache = DecodedImages()
    cache.limit = 10 * 100  # room for 10 images of 100 bytes
    train, decoded = fake_dataset("train", 8, 100)
    cache.add(train)
    assert (len(cache.images), cache.bytes, train.augment) == (8, 800, True)
    cache.add(train)  # a second trial: nothing new
    assert decoded == list(range(8))
    val, _ = fake_dataset("val", 5, 100)
    cache.add(val)
    assert (len(cache.images), cache.bytes) == (10, 1000)  # exactly the limit: 2 of the 5 fit
    other, decoded_other = fake_dataset("other", 3, 100)
    cache.add(other)
    assert decoded_other == [] and cache.bytes == 1000  # full: not decoded just to be dropped


def test_a_cache_of_zero_holds_nothing():
    cache = DecodedImages()
    train, decoded = fake_dataset("train", 4, 100)
    cache.add(train)
    assert (cache.images, decoded) == ({}, [])


def test_images_are_decoded_without_augmenting_and_held_as_decoded():
    """Decoding with the dataset's augment on would fill Ultralytics' mosaic buffer as a side effect."""
    cache = DecodedImages()
    cache.limit = 1000
    train, _ = fake_dataset("train", 3, 100)
    seen, load = [], train._load_image_uncached
    train._load_image_uncached = lambda i, *a: seen.append(train.augment) or load(i, *a)
    cache.add(train)
    assert seen == [False] * 3 and train.augment is True
    assert [(key[0], value[0].nbytes, value[1:]) for key, value in cache.images.items()] == \
        [(f"train/{i}.jpg", 100, ((1, 1), (1, 1))) for i in range(3)]
