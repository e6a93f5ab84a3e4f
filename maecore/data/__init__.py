"""The input pipeline, one job a module; each imports only from those listed above it (and from ``maecore.errors``
/ ``maecore.cli``), never from the tasks.  Callers import a name from the module that defines it: this package
re-exports nothing, so importing the image loader does not load the decoders (torchvision) or the pack format.

* :mod:`~maecore.data.sampler`: :class:`ResumableSampler` (rank shards, per-sample seeds, mid-epoch resume) and
  :class:`SeededDataset` (each sample's RNGs seeded from them);
* :mod:`~maecore.data.images`: the protected loader (:func:`load_rgb`, :data:`UNREADABLE`) and :class:`ImageFiles`,
  an image folder that skips and counts unreadable files;
* :mod:`~maecore.data.workers`: DataLoader workers' error lines, signals and shutdown;
* :mod:`~maecore.data.jpegroi`: crop-box decoding of JPEGs with restart markers;
* :mod:`~maecore.data.crop`: ``--decode fast``'s worker half, :class:`FastRandomResizedCrop` (uint8 out);
* :mod:`~maecore.data.pixels`: its batches, collated pixel-interleaved and normalised on the device;
* :mod:`~maecore.data.gpu`: ``--decode gpu`` (:class:`GpuJpegCrop` in the workers, :class:`GpuDecode` on the device);
* :mod:`~maecore.data.decode`: the ``--decode`` choice the training CLIs share, and what each choice needs;
* :mod:`maecore.data.packed`: packed (sharded tar) datasets: format, reader, writer, verifier, command line.
"""
