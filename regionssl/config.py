"""All configuration keys regionssl adds to Detectron2's config.

Model-side keys live under ``MODEL.REGIONSSL``, input-side keys under ``INPUT.REGIONSSL``,
optimizer keys under ``SOLVER.REGIONSSL``, and keys that observe a run without changing it (probe,
experiment tracking) under ``TEST.REGIONSSL``, next to Detectron2's own evaluation keys. Nothing is
added to Detectron2's own subtrees. Each key carries one comment: meaning, unit/range and the
paper symbol where there is one. Defaults are the official InsLoc / MoCo-v2 values; method
leaves under ``configs/`` override what differs.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_regionssl_config", "per_level"]


def add_regionssl_config(cfg):
    """Add every regionssl key to ``cfg`` (in place). Safe to call twice."""
    if "REGIONSSL" in cfg.MODEL:
        return cfg
    _add_model_keys(cfg)
    _add_input_keys(cfg)
    _add_solver_keys(cfg)
    _add_test_keys(cfg)
    return cfg


def per_level(key, values, levels, levels_key="MODEL.REGIONSSL.IN_FEATURES"):
    """``list(values)`` if it has one entry per entry of ``levels``, else a ValueError naming both keys.

    Args:
        key (str): full config key of the list, e.g. "MODEL.REGIONSSL.LEVEL_WEIGHTS".
        values: its value.
        levels (list): what the entries correspond to (the value of ``levels_key``).
        levels_key (str): the config key (or a description) ``levels`` comes from.
    """
    values = list(values)
    if len(values) != len(levels):
        raise ValueError(
            f"{key} = {values} has {len(values)} entries; it needs {len(levels)}, one per entry of "
            f"{levels_key} = {list(levels)}."
        )
    return values


def _add_model_keys(cfg):
    cfg.MODEL.REGIONSSL = CN()
    r = cfg.MODEL.REGIONSSL
    # Registered encoder (trunk layout, regionssl/modeling/encoders.py): "GlobalEncoder",
    # "RoIEncoder", "C4Encoder" or "FPNEncoder". Empty: chosen from the backbone, IN_FEATURES and
    # whether the method compares whole views (encoders.default_encoder_name).
    r.ENCODER = ""
    # Feature maps the region features are pooled from, e.g. ["p2","p3","p4","p5"] (InsLoc-FPN),
    # ["res4"] (C4 variants, followed by roi_heads.res5) or ["res5"] (SCRL).
    r.IN_FEATURES = ["res5"]
    # Loss weight w_l per entry of IN_FEATURES (InsLoc: all 1).
    r.LEVEL_WEIGHTS = [1.0]
    # Softmax temperature T of InfoNCE (MoCo-v2 / InsLoc / ReSim: 0.2).
    r.TEMPERATURE = 0.2
    # Shuffle the key encoder's batch across processes before BatchNorm (MoCo's shuffle-BN),
    # which removes the intra-batch statistics shortcut. No-op in a single process.
    r.SHUFFLE_BN = True
    # Per process, run query and key batches in this many groups (BatchNorm statistics per group),
    # keys shuffled across groups: shuffle-BN over virtual devices in one process (MoCo's 1-GPU
    # demo, SplitBatchNorm + shuffle). 1 = off: in one process the BN shortcut then remains.
    r.BN_SPLITS = 1

    r.ROI = CN()
    # RoIAlign output size (InsLoc: 7, SCRL: 1).
    r.ROI.POOLER_RESOLUTION = 7
    # RoIAlign sampling ratio; 0 = adaptive (torchvision's -1).
    r.ROI.SAMPLING_RATIO = 0
    # RoIAlign "aligned" half-pixel offset (InsLoc: True; SCRL's official code: False).
    r.ROI.ALIGNED = True

    r.MOMENTUM = CN()
    # EMA coefficient m (MoCo/InsLoc: 0.999 constant; BYOL/SCRL: tau_0 = 0.996/0.97 with cosine).
    r.MOMENTUM.BASE = 0.999
    # "constant" or "cosine": tau_k = 1 - (1 - tau_0) * (cos(pi k / K) + 1) / 2, k = global iter.
    r.MOMENTUM.SCHEDULE = "constant"

    r.QUEUE = CN()
    # Number of negatives K per queue (MoCo/InsLoc: 65536). 0 = no queue: the negatives of each query
    # are the other keys of the global batch (MoCo v3), never stale; for small-batch runs.
    r.QUEUE.SIZE = 65536

    r.PROJECTOR = CN()
    # Hidden width of the projection MLP g (MoCo-v2: 2048; BYOL/SCRL: 4096; InsLoc: 1024).
    r.PROJECTOR.HIDDEN_DIM = 2048
    # Output width of g, the embedding dim (MoCo/InsLoc: 128; BYOL/SCRL: 256).
    r.PROJECTOR.OUT_DIM = 128
    # Normalisation after the hidden layer: "" (MoCo-v2), "BN" or "SyncBN" (BYOL/SCRL sync it
    # across GPUs; -> "naiveSyncBN" for CPU processes). BYOL/SCRL/CVSA use it for the predictor too.
    r.PROJECTOR.NORM = ""
    # MoCo-rule methods (InsLoc, MoCo-v2, ReSim's instance branch): normalisation of the projector's
    # output, BN without scale/shift as MoCo v3 ("" = none, the official MoCo-v2 head). Removes the
    # direction every embedding shares, which dominates at random initialisation in small runs.
    r.PROJECTOR.OUT_NORM = ""

    r.PREDICTOR = CN()
    # Hidden width of the BYOL predictor q (4096); output width equals PROJECTOR.OUT_DIM.
    r.PREDICTOR.HIDDEN_DIM = 4096

    r.RESIM = CN()
    # Weight of the instance-level MoCo-v2 term L_inst in L = L_inst + sum_l L_l.
    r.RESIM.INSTANCE_WEIGHT = 1.0
    # Per IN_FEATURES entry: all-gather the key-map negatives across processes (official: P4 yes, P3 no).
    r.RESIM.GATHER_NEGATIVES = [True]
    # Kernel of the stride-1 average pooling applied to the key map before it is used as negatives (3).
    r.RESIM.NEGATIVE_POOL = 3

    r.SWAV = CN()
    # Number of prototypes K_c (3000).
    r.SWAV.NUM_PROTOTYPES = 3000
    # Sinkhorn entropy epsilon (0.05; the README advises 0.03 if the loss sticks at ln K_c).
    r.SWAV.EPSILON = 0.05
    # Sinkhorn-Knopp iterations (3).
    r.SWAV.SINKHORN_ITERS = 3
    # Softmax temperature tau of the swapped prediction (0.1).
    r.SWAV.TEMPERATURE = 0.1
    # Prototypes receive no gradient for this many iterations (5005 for batch 256, 313 for 4096).
    r.SWAV.FREEZE_PROTOTYPES_ITERS = 5005
    # Indices of the crops whose codes are computed (the two large crops: [0, 1]).
    r.SWAV.CROPS_FOR_ASSIGN = [0, 1]
    # Feature-queue length L for small batches, global over all processes (3840 for batch 256); 0 = none.
    r.SWAV.QUEUE_LENGTH = 0
    # Global iteration from which batches are written to the queue; it joins the Sinkhorn problem
    # once full, as officially (epoch_queue_starts 15 of the batch-256 recipe: 15 x 5005).
    r.SWAV.QUEUE_START_ITER = 0
    # Also apply the swapped prediction to RoI features of the aligned boxes of crops 0 and 1
    # (extra loss "loss_swav_region"; beyond the paper, see meta_arch/swav.py).
    r.SWAV.REGION = False

    r.CVSA = CN()
    # Weight lambda of the cross-view saliency alignment loss in L = L_BYOL + lambda * L_align.
    r.CVSA.ALIGN_WEIGHT = 1.0
    # Channels of the 1x1-conv projector / predictor used for the attention maps.
    r.CVSA.CONV_DIM = 256
    # Temperature of the softmax that turns query-key similarities into attention.
    r.CVSA.TEMPERATURE = 0.1


def _add_input_keys(cfg):
    cfg.INPUT.REGIONSSL = CN()
    i = cfg.INPUT.REGIONSSL
    # How views are made from one image: "TwoCrops", "TwoCropsSharedFlip" (ReSim), "MultiCrop" (SwAV),
    # "CopyPaste" (InsLoc) or "SaliencySwap" (CVSA). Registered in regionssl.data.views.
    i.VIEW_GENERATOR = "TwoCrops"
    # Which regions are matched across views: "WholeView", "PastedBox" (InsLoc), "IntersectionBoxes"
    # (SCRL) or "SlidingWindows" (ReSim). Registered in regionssl.data.regions.
    i.REGION_SAMPLER = "WholeView"
    # Output side of every (large) view in pixels (224; InsLoc's canvas: 256).
    i.CROP_SIZE = 224
    # RandomResizedCrop area fraction range s (MoCo-v2/SCRL/ReSim: (0.2, 1.0)).
    i.CROP_SCALE = (0.2, 1.0)
    # RandomResizedCrop aspect-ratio range r, sampled log-uniformly (torchvision: (3/4, 4/3)).
    i.CROP_RATIO = (0.75, 1.3333333)
    # Resize interpolation of crops: "bilinear", "bicubic" (BYOL/SCRL) or "nearest" (exact pixels, for tests).
    i.INTERPOLATION = "bilinear"
    # Probability of a horizontal flip of each view.
    i.FLIP_PROB = 0.5
    # A pair yielding no valid region is re-drawn this many times, then the image is skipped with a warning.
    i.MAX_RESAMPLE = 10
    # Draw the images group by group (``"group"`` of the dataset records: a video clip, a stereo pair;
    # images without one are their own group): rounds over all groups in random order, one random
    # member each, so every group is drawn equally often and a batch rarely holds one group twice.
    i.BALANCE_GROUPS = False
    # Decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) when every crop shrinks at least that much.
    # (CopyPaste's backgrounds, squeezed whole into the canvas, are always decoded at their pasted size.)
    i.JPEG_DRAFT = True
    i.LOADER = CN()
    # How loader workers start: "fork" (share the training process's memory, start at once; workers
    # never touch CUDA), "forkserver", "spawn" (re-import everything per worker), or "" for Python's default.
    i.LOADER.START_METHOD = "fork"

    i.PHOTOMETRIC = CN()
    # Colour jitter strengths (brightness, contrast, saturation, hue) (MoCo-v2: 0.4,0.4,0.4,0.1).
    i.PHOTOMETRIC.COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)
    # "torchvision" (MoCo/SCRL/SwAV/ReSim/InsLoc) or "deepmind" (BYOL's JAX ops: additive brightness,
    # per-channel contrast, HSV saturation), see regionssl/data/photometric.py.
    i.PHOTOMETRIC.COLOR_JITTER_SEMANTICS = "torchvision"
    # Probability of applying colour jitter (0.8).
    i.PHOTOMETRIC.COLOR_JITTER_PROB = 0.8
    # Probability of converting to grayscale (0.2).
    i.PHOTOMETRIC.GRAYSCALE_PROB = 0.2
    # Blur probability per view (MoCo-v2: 0.5, 0.5; BYOL asymmetric: 1.0, 0.1). Last value repeats.
    i.PHOTOMETRIC.BLUR_PROB = [0.5, 0.5]
    # Gaussian blur sigma range in pixels (0.1, 2.0).
    i.PHOTOMETRIC.BLUR_SIGMA = (0.1, 2.0)
    # "gaussian" (MoCo/BYOL) or "resize" (SCRL: down-scale by 1.1/1.2/1.5 and back up).
    i.PHOTOMETRIC.BLUR_TYPE = "gaussian"
    # Blur before colour jitter and grayscale (ReSim's order) instead of after them (MoCo-v2's).
    i.PHOTOMETRIC.BLUR_FIRST = False
    # Solarize probability per view (BYOL: 0.0, 0.2). Last value repeats.
    i.PHOTOMETRIC.SOLARIZE_PROB = [0.0, 0.0]
    # Turn every photometric op off (geometry tests, visualisation).
    i.PHOTOMETRIC.ENABLED = True
    # Draw the ops in the mapper but apply them in the model, batched on its device, before
    # normalisation (regionssl/data/photometric_batch.py): the loader then only decodes and resamples.
    i.PHOTOMETRIC.ON_DEVICE = False

    i.MULTI_CROP = CN()
    # Number of crops per resolution (SwAV: [2, 6]).
    i.MULTI_CROP.NUM_CROPS = [2, 6]
    # Side of each resolution's crops (SwAV: [224, 96]).
    i.MULTI_CROP.SIZES = [224, 96]
    # Minimum area fraction per resolution (SwAV: [0.14, 0.05]).
    i.MULTI_CROP.MIN_SCALES = [0.14, 0.05]
    # Maximum area fraction per resolution (SwAV: [1.0, 0.14]).
    i.MULTI_CROP.MAX_SCALES = [1.0, 0.14]

    i.COPY_PASTE = CN()
    # Range [lo, hi) of the random target width and height the foreground crop is rescaled to (128, 255).
    i.COPY_PASTE.FG_SIZE = (128, 255)
    # Paste the same foreground crop in both composites (False = official: one crop per composite).
    i.COPY_PASTE.SHARED_CROP = False

    i.JITTER = CN()
    # Make an anchor-jittered copy of the query box (InsLoc's box augmentation, used for P5 only).
    i.JITTER.ENABLED = False
    # Stride of the anchor grid the jittered box is drawn from (InsLoc: P4, 16 px).
    i.JITTER.ANCHOR_STRIDE = 16
    # Anchor sizes in pixels (InsLoc: 32, 64, 128, 256).
    i.JITTER.ANCHOR_SIZES = [32, 64, 128, 256]
    # Anchor aspect ratios h/w (InsLoc: 0.5, 0.75, 1, 1.5, 2).
    i.JITTER.ANCHOR_RATIOS = [0.5, 0.75, 1.0, 1.5, 2.0]
    # An anchor qualifies when its IoU with the box exceeds this (0.5).
    i.JITTER.IOU_THRESHOLD = 0.5
    # Anchor centres at (OFFSET + k) * stride (InsLoc's mmdet anchors: 0.0, i.e. 0, 16, 32, ...).
    i.JITTER.ANCHOR_OFFSET = 0.0
    # NMS IoU threshold among qualifying anchors, with random scores; one survivor is drawn (0.7).
    # 1.0 = no suppression: uniform over the qualifying anchors.
    i.JITTER.NMS_THRESHOLD = 0.7
    # If no anchor qualifies, the candidates are this many anchors of highest IoU (4000; 1 = best).
    i.JITTER.FALLBACK_TOPK = 4000

    i.INTERSECTION = CN()
    # At most this many boxes per image (SCRL: 10).
    i.INTERSECTION.MAX_BOXES = 10
    # Minimum box side in pixels at the coarser view's scale (SCRL: 32).
    i.INTERSECTION.MIN_SIZE = 32
    # A candidate is rejected if its IoU with an accepted box of the same image is >= this (0.5).
    i.INTERSECTION.IOU_THRESHOLD = 0.5
    # Tries per box; after that the last candidate is accepted anyway (SCRL: 50).
    i.INTERSECTION.MAX_TRIES = 50

    i.WINDOWS = CN()
    # Sliding-window sides in query-view pixels, one per group (ReSim: [48, 32] for P4, P3).
    i.WINDOWS.SIZES = [48]
    # Sliding-window strides in query-view pixels, one per group (ReSim: [32, 24]).
    i.WINDOWS.STRIDES = [32]

    i.SALIENCY = CN()
    # Where saliency masks come from: "spectral_residual" (computed on the fly) or "mask_files".
    i.SALIENCY.SOURCE = "spectral_residual"
    # Folder of per-image masks named like the image with a .png suffix (SOURCE "mask_files").
    i.SALIENCY.MASK_DIR = ""
    # Side of the pasted salient window as a fraction of the shorter image side.
    i.SALIENCY.WINDOW_FRACTION = 0.5


def _add_solver_keys(cfg):
    cfg.SOLVER.REGIONSSL = CN()
    s = cfg.SOLVER.REGIONSSL
    # "SGD" (Detectron2's, incl. SOLVER.NESTEROV; InsLoc uses Nesterov) or "LARS" (BYOL/SCRL/SwAV).
    s.OPTIMIZER = "SGD"
    # LARS trust coefficient eta (1e-3).
    s.LARS_TRUST = 0.001
    # LARS: biases and norm parameters get neither adaptation nor weight decay.
    s.LARS_EXCLUDE_BIAS_AND_NORM = True
    # If set, a regular expression on parameter names choosing the excluded parameters instead of
    # "every bias and norm layer" (SCRL's name rule, see configs/scrl.yaml and docs/methods/scrl.md).
    s.LARS_EXCLUDE_NAMES = ""
    # SCRL's CustomLARS quirk: excluded gradients are multiplied by lr before SGD applies lr again
    # (step lr^2 * g). Only configs/scrl.yaml turns it on (docs/methods/scrl.md).
    s.LARS_EXCLUDED_GRAD_TIMES_LR = False
    # Gradient accumulation k: each optimizer step runs k micro-batches of IMS_PER_BATCH / k images
    # and averages their gradients (1 = off). REFERENCE_WORLD_SIZE scaling counts every process as
    # k processes, so N GPUs with k = 8 / N run an 8-GPU recipe unchanged.
    s.ACCUMULATE = 1
    # With ACCUMULATE > 1, run even when the method's update is not the large batch's (BatchNorm,
    # shuffle-BN, Sinkhorn or in-batch negatives see B/k instead of B); a warning says what differs.
    s.ACCUMULATE_ALLOW_DIFFERENCE = False


def _add_test_keys(cfg):
    cfg.TEST.REGIONSSL = CN()
    t = cfg.TEST.REGIONSSL
    # Run the view-matching retrieval probe every this many iterations (0 = never).
    t.PROBE_PERIOD = 0
    # Image-only dataset the probe draws its held-out images from (not in DATASETS.TRAIN).
    t.PROBE_DATASET = "regionssl_demo_images_heldout"
    # At most this many probe images.
    t.PROBE_MAX_IMAGES = 64
    # Side in pixels of the probe's two views (fixed across methods; 224 = MoCo's crop).
    t.PROBE_CROP_SIZE = 224
    # Probe rounds: each draws one view pair (one region) per image tile and retrieves among all tiles.
    t.PROBE_ROUNDS = 8
    # Tiles per side of each probe image (g x g places per image); 0 = the smallest g giving >= 64
    # tiles in all. g > 1 makes regions compete with the other places of their own image.
    t.PROBE_GRID = 0
    # Frames of one video clip (records sharing a "group") are near-duplicates: a region's nearest
    # neighbour in the next frame is the same place, scored as a miss. True keeps one image per group
    # (the middle frame), so every gallery region is a distinct place.
    t.PROBE_ONE_PER_GROUP = True

    # Experiment tracking: scalars of the EventStorage (losses, lr, regionssl/*, probe/*, AP) are also
    # written to Weights & Biases and/or MLflow, from the main process, every 20 iterations (as the
    # TensorBoard writer). Off by default; the packages are imported only when enabled.
    t.WANDB = CN()
    t.WANDB.ENABLED = False
    # W&B project and entity ("" = the account's default entity).
    t.WANDB.PROJECT = "regionssl"
    t.WANDB.ENTITY = ""
    # "online", "offline" (files under OUTPUT_DIR/wandb; `wandb sync` later) or "disabled".
    t.WANDB.MODE = "online"
    # Run name ("" = the last component of OUTPUT_DIR). The run id is kept in OUTPUT_DIR/wandb_run_id
    # so a resumed (e.g. requeued) job continues the same run.
    t.WANDB.RUN_NAME = ""
    t.MLFLOW = CN()
    t.MLFLOW.ENABLED = False
    # Tracking URI, e.g. "http://mlflow:5000", "sqlite:///mlflow.db", "file:/path/mlruns" (MLflow 3
    # also wants MLFLOW_ALLOW_FILE_STORE=true for file:) ("" = MLflow's default, $MLFLOW_TRACKING_URI).
    t.MLFLOW.TRACKING_URI = ""
    t.MLFLOW.EXPERIMENT = "regionssl"
    # Run name ("" = the last component of OUTPUT_DIR); the run id is kept in OUTPUT_DIR/mlflow_run_id.
    t.MLFLOW.RUN_NAME = ""

    # Log each stage's conv weight norm over its norm at random initialisation (stem, res2-res5, fpn,
    # box_head: regionssl/weight_norm/<stage>) every this many iterations and after the last (0 = never).
    t.WEIGHT_NORM_PERIOD = 20

    t.GUARD = CN()
    # Watch the losses and diagnostics the model logs and warn when the run collapses or stalls.
    t.GUARD.ENABLED = True
    # Also stop the run then (TrainingCollapsed, as Detectron2 stops on a non-finite loss).
    t.GUARD.STOP = False
    # First iteration checked; -1 = max(SOLVER.WARMUP_ITERS, min(1000, SOLVER.MAX_ITER // 5)).
    t.GUARD.START_ITER = -1
    # Check every this many iterations.
    t.GUARD.PERIOD = 20
    # Every signal is its median over the last this many iterations (one noisy step cannot trigger).
    t.GUARD.WINDOW = 20
    # Collapse: embedding std below this fraction of 1/sqrt(D), the std of uniformly spread D-dim unit vectors.
    t.GUARD.MIN_EMB_STD_FRACTION = 0.05
    # Collapse onto one direction: the effective number of directions a batch's embeddings span
    # (emb_rank, the participation ratio; 1 = one line) below this. 1.05 ~ every pair at |cos| >= 0.975.
    t.GUARD.MIN_EMB_RANK = 1.05
    # Stall: loss / weight not below its chance level (InfoNCE ln(K+1), SwAV ln K_c) by this many nats.
    t.GUARD.MIN_CHANCE_MARGIN = 0.05
    # Stall: mean positive cosine similarity not above the mean negative one by this much.
    t.GUARD.MIN_SIM_GAP = 0.01
    # A stall (either kind) is reported once it has held at this many consecutive checks: one window's
    # median of a loss over a few keys can touch its chance level while the run learns. Collapses: at once.
    t.GUARD.STALL_PATIENCE = 3
    # Fine-tunability: warn (never stop) when a stage's conv weight norm exceeds this many times its norm
    # at random initialisation (regionssl/weight_norm/<stage>; a detector fine-tuned from it moves that
    # stage ~ratio^2 times more slowly than a fresh one). 0 = off.
    t.GUARD.MAX_WEIGHT_NORM_GROWTH = 4.0
    # A condition that persists is warned about again only after this many iterations.
    t.GUARD.REPEAT_PERIOD = 1000

    t.WEIGHTS_GUARD = CN()
    # Before every checkpoint, stop the run instead of saving weights that are not finite (NaN/Inf in
    # any parameter or buffer) or exploded (regionssl/engine/weights_guard.py).
    t.WEIGHTS_GUARD.ENABLED = True
    # Exploded: the norm of all parameters together above this multiple of its value when the run
    # (or its resumption) started; 0 = check finiteness only. (A divergence stop, unlike
    # GUARD.MAX_WEIGHT_NORM_GROWTH, which warns about one stage growing beyond fine-tunability.)
    t.WEIGHTS_GUARD.MAX_NORM_GROWTH = 100.0

    t.LOADER_WAIT = CN()
    # Warn when the model waits for data: Detectron2's data_time (the slowest process's wait in
    # next(data_loader)) above this fraction of the iteration time, summed over a window (0.0 = off).
    t.LOADER_WAIT.MAX_FRACTION = 0.2
    # Window in iterations; checked every window from the second on (the first is the workers' start-up).
    # A wait that persists is warned about again after 10 windows.
    t.LOADER_WAIT.WINDOW = 100
