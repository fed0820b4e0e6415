"""Images decoded and resized once per Ray worker process, for all the trials it runs
(``resources.image_cache_mb``; trainable.py turns it on for each trial)."""

from __future__ import annotations

from multiprocessing.pool import ThreadPool
from typing import Dict


class DecodedImages:
    """Images decoded and resized once per worker process, for all the trials it runs.

    Every trial of an experiment reads the same images at the same size, and Ultralytics decodes
    them again in each trial (and each epoch, unless ``cache=ram``). A dataset built in this process
    first adds its images to this cache, up to ``limit`` bytes (beyond it, images are read from disk
    as Ultralytics reads them), and its ``load_image`` takes them from here; loader processes forked
    afterwards (GPU trials) inherit them. Ultralytics' own RAM cache hands out its arrays the same way
    (its transforms copy before they change an image), and the mosaic buffer is kept as
    Ultralytics keeps it, so a trial's batches, and its results, are the same with or without it.
    """

    def __init__(self):
        self.images: Dict[tuple, tuple] = {}
        self.bytes = self.limit = 0
        self.threads, self.full = 1, False

    def use(self, limit: int, threads: int) -> None:
        from ultralytics.data.base import BaseDataset

        self.limit, self.threads = limit, threads
        if not hasattr(BaseDataset, "_load_image_uncached"):  # once per process
            BaseDataset._load_image_uncached = BaseDataset.load_image
            init = BaseDataset.__init__

            def __init__(dataset, *args, **kwargs):
                init(dataset, *args, **kwargs)
                self.add(dataset)

            def load_image(dataset, i, rect_mode=True, resize_short=False):
                return self.load_image(dataset, i, rect_mode, resize_short)

            BaseDataset.__init__, BaseDataset.load_image = __init__, load_image

    @staticmethod
    def key(dataset, i: int, rect_mode: bool = True, resize_short: bool = False) -> tuple:
        return dataset.im_files[i], str(dataset.imgsz), rect_mode, resize_short, dataset.cv2_flag

    def add(self, dataset) -> None:
        """Decode the dataset's images that are not here yet, while the limit allows."""
        if dataset.cache == "ram" or not self.limit:
            return  # Ultralytics keeps its own copy of every image for this trial, or the cache is off
        new = [] if self.full else [i for i in range(dataset.ni) if self.key(dataset, i) not in self.images]
        if new:
            self._decode(dataset, new)
        print(f"yolotune: {dataset.ni - len(new)} of {dataset.ni} images decoded by an earlier trial of this worker, "
              f"{len(self.images)} held ({self.bytes / 2**20:.1f} of {self.limit / 2**20:.0f} MiB)")

    def _decode(self, dataset, indices) -> None:
        augment, dataset.augment = dataset.augment, False  # decode only, no mosaic buffer bookkeeping
        try:
            with ThreadPool(self.threads) as pool:
                for i, decoded in zip(indices, pool.imap(dataset._load_image_uncached, indices)):
                    if self.bytes + decoded[0].nbytes > self.limit:
                        self.full = True  # later datasets are not decoded twice just to find that out
                        break
                    self.images[self.key(dataset, i)] = decoded
                    self.bytes += decoded[0].nbytes
        finally:
            dataset.augment = augment

    def load_image(self, dataset, i: int, rect_mode: bool = True, resize_short: bool = False):
        decoded = None if dataset.ims[i] is not None else self.images.get(self.key(dataset, i, rect_mode, resize_short))
        if decoded is None:  # in Ultralytics' RAM cache or mosaic buffer, or not held here
            return dataset._load_image_uncached(i, rect_mode, resize_short)
        if dataset.augment and dataset.cache != "ram":  # Ultralytics' mosaic buffer, as load_image keeps it
            dataset.ims[i], dataset.im_hw0[i], dataset.im_hw[i] = decoded
            dataset.buffer.append(i)
            if 1 < len(dataset.buffer) >= dataset.max_buffer_length:
                j = dataset.buffer.pop(0)
                dataset.ims[j], dataset.im_hw0[j], dataset.im_hw[j] = None, None, None
        return decoded


DECODED_IMAGES = DecodedImages()
