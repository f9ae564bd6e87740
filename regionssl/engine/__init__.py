from .setup import adapt_to_machine, check_weights_path, get_regionssl_cfg
from .trainer import FinetuneTrainer, PretrainTrainer, is_pretraining, trainer_for, wrap_ddp
