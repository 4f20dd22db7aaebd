"""Import sources: where the images of a bulk import come from.

A source is an ordered stream of members (``base.Member``: a name, metadata such as a label, and
a way to read the bytes), behind one protocol (``base.Source``): ``params``/``from_params`` turn
it into a job's stored JSON and back, ``members`` lists the members in a fixed order (so that a
resumed job skips the first ``n`` without reading them), ``count`` tells how many there are
without reading any, ``uploads`` names the files kept for it until its job ends. A member that
cannot be imported (a link, an unsafe name, a file over a cap) is listed with a reason code and
never read.

The kinds, by the name a job stores (``kinds.KINDS``):

- ``archive`` (archive.py): an uploaded zip or tar, with an optional manifest beside or inside it;
  tars are read in one pass by tar_listing.py.
- ``folder`` (folder.py): a folder on the server, subfolder names as labels.
- ``holidays`` (holidays.py): a server folder with an INRIA Holidays ``groundtruth.json``.
- ``idx`` (idx.py): MNIST-format IDX files in a server folder.
- ``manifest`` (manifest.py): a CSV or JSON-lines file on the server naming files and metadata
  (the format: manifests.py).
- ``dataset`` (dataset.py): a split of a built-in dataset (datasets.py: MNIST).
- ``urls`` (urls.py): image URLs, fetched from public hosts only (url_checks.py, fetch.py).

``choose.choose_source`` turns a request (the HTTP route's body or upload, the ``cbir import``
argument) into a checked source; server files over HTTP are confined to the import roots
(files.py).
"""
