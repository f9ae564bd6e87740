"""Official checkpoints in: each official layout is built from our own model's tensors under the
official key names (as the official model code names them), imported, and loaded into the
fine-tuning detector; every tensor must land unchanged, and nothing of the momentum encoder."""
import functools
import os
import pickle
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

import regionssl  # noqa: F401
from regionssl.checkpoint import RegionSSLCheckpointer, to_trunk_relative
from regionssl.checkpoint_import import UnplacedKeysError, import_checkpoint

from conftest import QS, ROOT, cfg_of
from test_spine import _check_handoff
from regionssl_workbench.scripts import load_script

import_tool = load_script("tools/import_checkpoint.py")

FT = os.path.join(ROOT, "configs", "finetune")
FPN_QS = os.path.join(QS, "finetune_coco_mask_rcnn_R_50_FPN_instant_test.yaml")
C4_QS = os.path.join(QS, "finetune_coco_mask_rcnn_R_50_C4_instant_test.yaml")


def tv(rel):
    """Our trunk-relative name -> torchvision ResNet name (written independently of the importer)."""
    if rel.startswith("stem.conv1.norm."):
        return "bn1." + rel[len("stem.conv1.norm."):]
    if rel == "stem.conv1.weight":
        return "conv1.weight"
    m = re.match(r"^res(\d)\.(\d+)\.(.+)$", rel)
    stage, block, rest = int(m[1]) - 1, m[2], m[3]
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
    rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
    return f"layer{stage}.{block}.{rest}"


def online_trunk(sd):
    return {to_trunk_relative(k): v for k, v in sd.items() if not k.startswith("momentum.") and to_trunk_relative(k)}


def momentum_trunk(sd):
    return {to_trunk_relative(k[len("momentum."):]): v for k, v in sd.items()
            if k.startswith("momentum.") and to_trunk_relative(k[len("momentum."):])}


@functools.lru_cache(maxsize=None)
def pretrained(config):
    """A pretraining model whose momentum copy differs from the online encoder (as in test_spine).

    Cached: tests only read it."""
    torch.manual_seed(0)
    model = build_model(cfg_of(os.path.join(QS, config)))
    momentum = getattr(model, "momentum", torch.nn.Module())  # SwAV has none
    with torch.no_grad():
        for t in list(momentum.parameters()) + list(momentum.buffers()):
            if t.dtype.is_floating_point:
                t.add_(1.0)
    return model, model.state_dict()


def fpn_official(sd, prefix, momentum_prefix):
    """InsLoc's mmdet names for our FPN (BN) and 4conv1fc box head."""
    out = {}
    for key, value in sd.items():
        for ours, theirs in ((r"^backbone\.fpn_lateral(\d)\.norm\.", "neck.lateral_convs.{}.bn."),
                             (r"^backbone\.fpn_lateral(\d)\.", "neck.lateral_convs.{}.conv."),
                             (r"^backbone\.fpn_output(\d)\.norm\.", "neck.fpn_convs.{}.bn."),
                             (r"^backbone\.fpn_output(\d)\.", "neck.fpn_convs.{}.conv.")):
            m = re.match(ours, key)
            if m:
                out[theirs.format(int(m[1]) - 2) + key[m.end():]] = value
                break
        m = re.match(r"^roi_heads\.box_head\.conv(\d)\.(norm\.)?(\w+)$", key)
        if m:
            out[f"roi_head.bbox_head.shared_convs.{int(m[1]) - 1}.{'bn' if m[2] else 'conv'}.{m[3]}"] = value
        m = re.match(r"^roi_heads\.box_head\.fc1\.(\w+)$", key)
        if m:
            out[f"roi_head.bbox_head.shared_fcs.0.{m[1]}"] = value
    return out


def mocov2_layout(sd):
    state = {f"module.encoder_q.{tv(k)}": v for k, v in online_trunk(sd).items()}
    state.update({f"module.encoder_k.{tv(k)}": v for k, v in momentum_trunk(sd).items()})
    state.update({"module.encoder_q.fc.0.weight": torch.randn(2048, 2048), "module.encoder_q.fc.2.bias": torch.randn(128),
                  "module.queue": torch.randn(128, 65536), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}


def resim_layout(sd):
    ckpt = mocov2_layout(sd)
    # ReSim's FPN: laterals on C3-C5 and output convs on P3/P4 only, with bias, no norm
    for key, value in sd.items():
        m = re.match(r"^backbone\.(fpn_lateral[345]|fpn_output[34])\.(weight|bias)$", key)
        if m:
            ckpt["state_dict"][f"module.encoder_q.{m[1]}.{m[2]}"] = value
    return ckpt


def insloc_layout(sd):
    state = {f"backbone.{tv(k)}": v for k, v in online_trunk(sd).items()}
    state.update({f"backbone_k.{tv(k)}": v for k, v in momentum_trunk(sd).items()})
    state.update(fpn_official(sd, "", ""))
    state.update({f"{k.split('.')[0]}_k.{k.split('.', 1)[1]}": v + 1 for k, v in fpn_official(sd, "", "").items()})
    state.update({"roi_head.bbox_head.shared_fcs.1.weight": torch.randn(1024, 1024),
                  "roi_head.bbox_head.fc_cls.weight": torch.randn(128, 1024),
                  "queues": torch.randn(4, 128, 65536), "queue": torch.randn(128, 65536),
                  "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"meta": {"epoch": 200, "mmdet_version": "2.0"}, "state_dict": state, "optimizer": {}}


def insloc_c4_layout(sd):
    state = {}
    for rel, value in online_trunk(sd).items():
        name = tv(rel)
        state[("roi_head.shared_head." if name.startswith("layer4.") else "backbone.") + name] = value
    state.update({f"backbone_k.{tv(k)}": v for k, v in momentum_trunk(sd).items()})
    state.update({"roi_head.bbox_head.fc_cls.weight": torch.randn(128, 2048), "queues": torch.randn(1, 128, 32),
                  "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"meta": {}, "state_dict": state}


SEQ = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def scrl_layout(sd):
    def seq(name):
        first, rest = name.split(".", 1)
        return f"encoder.{SEQ[first]}.{rest}"

    online = {seq(tv(k)): v for k, v in online_trunk(sd).items()}
    online.update({"projector.net.0.weight": torch.randn(4096, 2048), "projector.net.3.weight": torch.randn(256, 4096)})
    target = {seq(tv(k)): v for k, v in momentum_trunk(sd).items()}
    return {"tag": "200", "epoch": 200, "online_network_state_dict": online, "target_network_state_dict": target,
            "predictor_state_dict": {"net.0.weight": torch.randn(4096, 256)}, "optimizer_state_dict": {}}


def swav_layout(sd):
    state = {f"module.{tv(k)}": v for k, v in online_trunk(sd).items()}
    state.update({"module.projection_head.0.weight": torch.randn(2048, 2048),
                  "module.projection_head.3.bias": torch.randn(128), "module.prototypes.weight": torch.randn(3000, 128)})
    return state  # the released SwAV files are a bare state dict


def byol_layout(sd):
    state = {tv(k): v for k, v in online_trunk(sd).items()}
    state.update({"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)})
    return state


FPN_4CONV = ["MODEL.ROI_BOX_HEAD.NUM_CONV", "4", "MODEL.ROI_BOX_HEAD.NUM_FC", "1", "MODEL.ROI_BOX_HEAD.NORM", "BN"]
CASES = [
    # (layout, our pretraining model, official builder, detector config + opts, prefixes beyond the trunk)
    ("mocov2", "mocov2_instant_test.yaml", mocov2_layout, (C4_QS, []), []),
    ("mocov2", "mocov2_instant_test.yaml", mocov2_layout, (os.path.join(FT, "coco_mask_rcnn_R_50_FPN_1x.yaml"), []), []),
    # the InsLoc protocol detector itself (4conv1fc + extra SyncBN head, SyncBN FPN)
    ("insloc", "insloc_fpn_instant_test.yaml", insloc_layout,
     (os.path.join(FT, "coco_mask_rcnn_R_50_FPN_4conv1fc_extranorm_1x.yaml"), []), ["backbone.fpn_", "roi_heads.box_head."]),
    ("insloc_c4", "insloc_c4_instant_test.yaml", insloc_c4_layout, (os.path.join(FT, "voc_R_50_C4_24k.yaml"), []), []),
    # ReSim's FPN convs have biases and no norm: a detector FPN without norm takes all of them
    ("resim", "resim_fpn_instant_test.yaml", resim_layout, (FPN_QS, ["MODEL.FPN.NORM", ""]),
     ["backbone.fpn_lateral3.", "backbone.fpn_lateral4.", "backbone.fpn_lateral5.", "backbone.fpn_output3.",
      "backbone.fpn_output4."]),
    ("scrl", "scrl_instant_test.yaml", scrl_layout, (FPN_QS, []), []),
    ("swav", "swav_instant_test.yaml", swav_layout, (os.path.join(FT, "coco_mask_rcnn_R_50_FPN_1x.yaml"), []), []),
    ("byol", "byol_instant_test.yaml", byol_layout, (C4_QS, []), []),
]


def _detector(config, opts):
    return build_model(cfg_of(config, *opts))


@pytest.mark.parametrize("layout,pre,official,det_cfg,extra", CASES,
                         ids=[f"{c[0]}->{os.path.basename(c[3][0])}" for c in CASES])
def test_official_layout_lands_in_detector(layout, pre, official, det_cfg, extra, tmp_path):
    model, sd = pretrained(pre)
    src, dst = str(tmp_path / "official.pth"), str(tmp_path / "imported.pth")
    torch.save(official(sd), src)
    result = import_tool.main([src, dst])  # auto-detected
    assert result["layout"] == layout
    det = _detector(*det_cfg)
    RegionSSLCheckpointer(det).load(dst)
    _check_handoff(model, det, extra)
    # nothing but the encoder came in: no key outside the trunk / FPN / box head
    assert all(k.startswith(("backbone.", "roi_heads.res5.", "roi_heads.box_head.")) for k in result["converted"])


def test_extra_fpn_keys_are_reported_not_lost(tmp_path):
    """ReSim's FPN biases have no place in a SyncBN FPN (the official transfer drops them too)."""
    model, sd = pretrained("resim_fpn_instant_test.yaml")
    src, dst = str(tmp_path / "resim.pth"), str(tmp_path / "imported.pth")
    torch.save(resim_layout(sd), src)
    import_checkpoint(src, dst, "resim")
    det = _detector(os.path.join(FT, "coco_mask_rcnn_R_50_FPN_1x.yaml"), [])
    incompatible = RegionSSLCheckpointer(det)._load_model(torch.load(dst, weights_only=False))
    assert set(incompatible.unexpected_keys) == {f"backbone.{n}.bias" for n in
                                                 ("fpn_lateral3", "fpn_lateral4", "fpn_lateral5", "fpn_output3", "fpn_output4")}
    assert torch.equal(det.state_dict()["backbone.fpn_lateral4.weight"], sd["backbone.fpn_lateral4.weight"])


@pytest.mark.parametrize("layout,pre,official,fine,extra", [
    ("insloc", "insloc_fpn_instant_test.yaml", insloc_layout, FPN_QS, ["backbone.fpn_", "roi_heads.box_head."]),
    ("mocov2", "mocov2_instant_test.yaml", mocov2_layout, C4_QS, []),
], ids=["insloc->fpn", "mocov2->c4"])
def test_imported_pkl_loads_into_stock_detectron2(layout, pre, official, fine, extra, tmp_path):
    model, sd = pretrained(pre)
    src, dst, pkl = str(tmp_path / "o.pth"), str(tmp_path / "i.pth"), str(tmp_path / "i.pkl")
    torch.save(official(sd), src)
    import_tool.main([src, dst, "--layout", layout, "--pkl", pkl])
    with open(pkl, "rb") as f:
        assert pickle.load(f)["matching_heuristics"] is True
    opts = FPN_4CONV if extra else []
    det = _detector(fine, opts)
    DetectionCheckpointer(det).load(pkl)  # stock Detectron2 loader
    _check_handoff(model, det, extra)


def test_unknown_keys_stop_the_import_and_are_listed(tmp_path):
    _, sd = pretrained("mocov2_instant_test.yaml")
    ckpt = mocov2_layout(sd)
    ckpt["state_dict"]["module.encoder_q.layer5.0.conv1.weight"] = torch.zeros(1)
    ckpt["state_dict"]["module.mystery_head.weight"] = torch.zeros(1)
    src = str(tmp_path / "odd.pth")
    torch.save(ckpt, src)
    with pytest.raises(UnplacedKeysError) as err:
        import_checkpoint(src, str(tmp_path / "x.pth"), "mocov2")
    msg = str(err.value)
    assert "could not place 2 keys" in msg
    assert "module.encoder_q.layer5.0.conv1.weight" in msg and "module.mystery_head.weight" in msg
    with pytest.raises(UnplacedKeysError, match="module.mystery_head.weight"):  # auto: closest layout named
        import_checkpoint(src, str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")
    # a layout that recognises nothing at all
    torch.save({"state_dict": {"encoder.blocks.0.attn.qkv.weight": torch.zeros(1)}}, src)
    with pytest.raises(UnplacedKeysError, match="no known layout"):
        import_checkpoint(src, str(tmp_path / "x.pth"))


def test_incomplete_trunk_is_named(tmp_path):
    _, sd = pretrained("byol_instant_test.yaml")
    state = {k: v for k, v in byol_layout(sd).items() if not k.startswith("layer4.")}
    src = str(tmp_path / "partial.pth")
    torch.save(state, src)
    with pytest.raises(UnplacedKeysError, match="no ResNet res5 keys"):
        import_checkpoint(src, str(tmp_path / "x.pth"), "byol")


def test_torchvision_resnet50_itself_lands_in_the_detector(tmp_path):
    """The ``byol`` layout is torchvision's ResNet-50: its real state dict (not one renamed by these
    tests) lands tensor for tensor, in a C4 detector with res5 under roi_heads."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    tv_sd = torchvision.models.resnet50().state_dict()
    src, dst = str(tmp_path / "resnet50.pth"), str(tmp_path / "imported.pth")
    torch.save(tv_sd, src)
    result = import_tool.main([src, dst])
    assert result["layout"] == "byol" and result["dropped"] == {"classifier": 2}
    det = _detector(C4_QS, [])
    RegionSSLCheckpointer(det).load(dst)
    trunk = {to_trunk_relative(k): v for k, v in det.state_dict().items() if to_trunk_relative(k)}
    landed = {tv(rel): v for rel, v in trunk.items() if rel != "res5.norm" and not rel.startswith("res5.norm.")}
    expected = {k: v for k, v in tv_sd.items() if not k.startswith("fc.")}
    assert set(expected) <= set(landed)
    for key, value in expected.items():
        assert torch.equal(landed[key], value), key
