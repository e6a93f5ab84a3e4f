"""Packed, sharded image datasets: WebDataset-style tar shards plus an index for random access.

``python -m maecore.data.packed SRC DST [--max_side N | --short_side N] [--quality Q] [--roi] [--subsampling S]
[--shard_size SIZE] [--workers N] [--force]`` (``python tools/pack_dataset.py`` is the same command) packs an image folder — with class
sub-folders (ImageNet layout) or without — into ``DST``; a classification root holding ``train/`` and
``val/`` is packed split by split into ``DST/train`` and ``DST/val``.  Every packed folder holds:

* ``shard-000000.tar``, … : for each sample ``{key}.jpg`` (or ``.png``… : the image's own format) and,
  with classes, ``{key}.cls`` (the label as decimal text), consecutive, so ``tar``, ``webdataset`` and any
  tar reader read them;
* ``packed-index.json``: the shards (name, byte size, sample count), the class names, and per sample (in
  columns) its shard, key, the byte offset and size of the image member's data, its extension and its label,
  the CRC-32 of the image bytes (``crc32``), the stored image's width, height, Pillow format and mode (so the fast
  decoder draws its crop without parsing the header), and with ``--roi`` the offset of its restart table; what
  was skipped at pack time and why.  Every column after the label is optional: packs made before one was added
  read as before (without it), and older readers ignore a column they do not know.  The index is written last: a folder without it is an
  interrupted pack, refused by the readers.
* with ``--roi``, ``shard-000000.roi.npy``, … : per shard one int32 array, the restart tables
  (:func:`maecore.data.jpegroi.restart_table`) of its images one after the other.

Samples are stored in the order :class:`maecore.data.images.ImageFiles` lists the folder (classes sorted, files
sorted), so a packed copy yields the same samples at the same indices as its folder: with the original
bytes kept, a run on either gives identical losses.

**Re-encoding: off by default.**  By default every image's original bytes are stored unchanged, so
packing never changes what the model sees (and the folder/packed equivalence above holds).  To save
disk and decode time, ``--short_side N`` (or ``--max_side N``) re-encodes images *larger* than the cap as
JPEG at ``--quality`` (default 90), resized with Lanczos; smaller images keep their bytes.  A good cap is
twice the largest training input (``--short_side 448`` for 224-pixel training): RandomResizedCrop then
upsamples only crops under a quarter of the image's area, which it would mostly do anyway.

**ROI packs: ``--roi``** re-encodes *every* image (any format; capped by ``--short_side``/``--max_side`` if
given) as a baseline JPEG at ``--quality`` (default 90, FFCV's default too) with a restart marker after every
MCU (``--roi_restart row``: every MCU row), and stores where each entropy-coded segment starts.  The fast decoder
(``--decode fast``) then decodes only the MCUs its crop box touches (:mod:`maecore.data.jpegroi`): the pixels are
those of the whole re-encoded image, cropped, bit for bit.  The cost: one more JPEG generation (quality 90
loses little, but the pixels are no longer the originals', so a run on a ROI pack is not the folder's run), the
markers (~7 % larger files for per-MCU markers on 500x375 4:2:0 photos, ~0 % per row) and the tables (~3 KB per
500x375 image per MCU, ~0.1 KB per row).  Every re-encode keeps the source's chroma subsampling
(``--subsampling keep``, the default: a JPEG's own 4:4:4, 4:2:2 or 4:2:0; 4:4:4 for other layouts and formats, which
hold full chroma; or one for all): a 4:4:4 source stays 4:4:4, at 4x the MCUs (files ~24 % larger than the source,
~12 KB of table per 500x375 image), where cutting it to 4:2:0 cost 11-13 dB of PSNR (docs/benchmarks.md).
Grey (``L``) images stay grey; anything else is stored as RGB
(converted as the training loader converts it).  docs/benchmarks.md has the measured gain.

Every image is decoded at pack time through the training loader's protected decoder
(:func:`maecore.data.images.load_rgb`): what training would skip (empty, not an image, truncated, no known 8-bit
scale) is skipped here, printed and counted in the index.  A record damaged after packing is skipped and
counted at read time like an unreadable file in a folder (``n_skipped``): every read checks the bytes against
their CRC-32 (``zlib.crc32``, ~3.6 GB/s: 1–2 % of the fast pipeline's time, docs/benchmarks.md), so damage that still decodes
(a flipped bit in the entropy-coded data) is caught too, not trained on.  ``python -m maecore.data.packed --verify DST``
checks a whole pack offline (:mod:`maecore.data.packed.verify`): every record's checksum, the shards' sizes and tar
structure, the restart tables; a summary, and for a damaged pack one ``error:`` line and exit status 2.

Reading (:class:`~maecore.data.packed.reader.PackedImages`) is random access by index — each process opens each
shard once and reads the recorded byte range — so the sampler's per-epoch permutation, rank shards and exact
mid-epoch resume (:class:`maecore.data.sampler.ResumableSampler`, :class:`~maecore.data.sampler.SeededDataset`)
work unchanged.  The same holds for a pack in object storage (``--data_path https://HOST/PATH/pack``, or ``s3://`` … through
fsspec): the index is read once, each record by one HTTP range request (:mod:`~maecore.data.packed.remote`), so a
run logs the same losses as on the pack on disk.

The modules, each importing only from those listed above it:

* :mod:`~maecore.data.packed.index`: the format's names, finding a packed folder, the checked index, a record;
* :mod:`~maecore.data.packed.store`: the storage seam, :class:`Store` (a packed folder's files read by byte range) and
  :class:`LocalStore` (``pread``);
* :mod:`~maecore.data.packed.cache`: the bounded local cache of a remote pack's records (``--cache_dir``);
* :mod:`~maecore.data.packed.wire`: the minimal HTTP/1.1 client of the range reads;
* :mod:`~maecore.data.packed.remote`: packs in object storage, ``--data_path https://…`` (HTTP range requests) or
  ``s3://`` / ``gs://`` … (fsspec): read-ahead, coalescing, retries;
* :mod:`~maecore.data.packed.reader`: :class:`PackedImages` (random access), :func:`iter_tar_samples` (in sequence);
* :mod:`~maecore.data.packed.writer`: :func:`pack`, :func:`pack_split`, :class:`ShardWriter`;
* :mod:`~maecore.data.packed.verify`: :func:`verify`, the offline check;
* :mod:`~maecore.data.packed.cli`: the command line (``__main__`` runs it).
* :mod:`~maecore.data.packed.serve`: a local nginx serving a folder on a loopback port (tests, ``--bench data``).
"""
