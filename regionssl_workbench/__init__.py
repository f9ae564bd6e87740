"""The workbench beside the regionssl library: what builds the project's test, demo and benchmark
data, and what the benchmarks share. Nothing in ``regionssl`` imports it.

* ``tiny_datasets``  the tiny synthetic COCO / VOC sets (test and demo data), built on first use
* ``photo_pool``     builds the photo pool (``regionssl_photos_*``; read by ``regionssl.data.photo_pool``)
* ``minidet``        builds the real-object detection set (``regionssl_minidet_*``)
* ``atomic``         builds a dataset folder once, safely, under concurrency
* ``host_reads``     counts the host reads of device tensors (GPU syncs) of a training step
* ``scripts``        imports a script of ``tools/`` or ``bench/`` as a module
"""
