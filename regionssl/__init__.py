"""regionssl: region-level self-supervised pretraining inside Detectron2."""
